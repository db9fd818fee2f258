#!/usr/bin/env bash
# make bench-cpu: embedding at the CPU's speed, against the main of the day the work was asked
# for (BENCH_BASE_REV, default 80d45a9), in one run on this machine:
#   - `hiercon index` (fresh output, no cache; the embedding phase it reports, and the whole command) on the
#     emoji catalogue and on a catalogue of 2-8 MP photos (bench/make_photos.py, BENCH_PHOTOS of
#     them): the base binary with the float model, this tree with the float model, this tree
#     with its int8 copy (`hiercon model quantize`, the defaults), interleaved over BENCH_ROUNDS
#     rounds, best round of each;
#   - the Python anchor end to end: PIL (JPEG draft mode) + ONNX Runtime from Python, with the
#     float model and with ORT's own Python quantiser's int8 model on the same calibration images;
#   - the served path: `hiercon serve` of the base binary (float) and of this tree (float, int8)
#     over the emoji index each built, driven by this tree's `hiercon bench-load --addr` at
#     c = 1/8/32 (BENCH_LOAD_SECONDS per level), interleaved over BENCH_ROUNDS rounds, medians.
# Results: bench/results/cpu-serving.json and .md (bench/cpu_serving_summary.py, which can be rerun
# on target/bench-cpu/runs/results.jsonl). Everything it builds stays in target/bench-cpu
# (the base binary is built once, from `git archive`, in its own target folder).
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_REV=${BENCH_BASE_REV:-80d45a9}
MODEL=${BENCH_MODEL:-models/emoji-lite0-hmce-mix.onnx}
PHOTOS=${BENCH_PHOTOS:-300}
ROUNDS=${BENCH_ROUNDS:-2}
LOAD_SECONDS=${BENCH_LOAD_SECONDS:-10}
PY=${VENV_PYTHON:-.cache/venv/bin/python}
EMOJI=data/emoji/manifest.jsonl
OUT=target/bench-cpu
CUR=${CARGO_TARGET_DIR:-target}/release/hiercon
BASE=$OUT/base/hiercon
mkdir -p "$OUT/base" "$OUT/runs"
[[ -f $EMOJI ]] || { echo "bench-cpu: $EMOJI missing (make data)"; exit 1; }

log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

if [[ ! -x $BASE ]]; then
  log "building the base binary ($BASE_REV) once"
  rm -rf "$OUT/base-src" && mkdir -p "$OUT/base-src"
  git archive "$BASE_REV" | tar -x -C "$OUT/base-src"
  (cd "$OUT/base-src" && CARGO_TARGET_DIR="$PWD/../base-target" cargo build --release --locked --quiet)
  cp "$OUT/base-target/release/hiercon" "$BASE"
fi
cargo build --release --locked --quiet

INT8=$OUT/int8.onnx
if [[ ! -f $INT8 ]]; then
  log "quantising $MODEL"
  $CUR model quantize "$MODEL" --manifest "$EMOJI" --out "$INT8" >&2
fi
ORT_INT8=$OUT/ort-int8.onnx
if [[ ! -f $ORT_INT8 ]]; then
  log "the ORT Python quantiser on the same calibration images"
  $PY bench/ort_quantize.py quantize "$MODEL" "${INT8%.onnx}.json" "$EMOJI" "$ORT_INT8" >&2
fi
PHOTO_DIR=$OUT/photos-$PHOTOS
if [[ ! -f $PHOTO_DIR/manifest.jsonl ]]; then
  log "making $PHOTOS photos"
  $PY bench/make_photos.py "$EMOJI" "$PHOTO_DIR" --limit "$PHOTOS" >&2
fi
PHOTO_MB=$(du -sm "$PHOTO_DIR/images" | cut -f1)

RESULTS=$OUT/runs/results.jsonl
: > "$RESULTS"
# index NAME BIN MODEL CATALOGUE MANIFEST: one fresh `hiercon index`, timed.
index() {
  local name=$1 bin=$2 model=$3 cat=$4 manifest=$5 dir=$OUT/runs/idx-$1-$4
  rm -rf "$dir"
  local n t0 t1
  n=$(grep -c . "$manifest")
  t0=$(date +%s.%N)
  "$bin" index --manifest "$manifest" --model "$model" --out "$dir" --keep 1 > "$dir.log" 2>&1 ||
    { cat "$dir.log" >&2; exit 1; }
  t1=$(date +%s.%N)
  local s embed embedded
  s=$(echo "$t1 - $t0" | bc -l)
  # The embedding phase (read, hash, decode, preprocess, embed) as the command reports it.
  embed=$(grep -o 'took embed [0-9.]*' "$dir.log" | grep -o '[0-9.]*$')
  embedded=$(grep -o 'embedded [0-9]*' "$dir.log" | head -1 | grep -o '[0-9]*$')
  log "index $name $cat: $n items in $s s (embedded $embedded in $embed s)"
  echo "{\"kind\":\"index\",\"config\":\"$name\",\"catalogue\":\"$cat\",\"images\":$n,\"seconds\":$s,\"embedded\":$embedded,\"embed_seconds\":$embed}" >> "$RESULTS"
}
# anchor NAME MODEL CATALOGUE MANIFEST: the Python pipeline end to end.
anchor() {
  local line
  line=$($PY bench/ort_quantize.py embed "$2" "$4" --size 128)
  log "python $1 $3: $line"
  echo "{\"kind\":\"index\",\"config\":\"$1\",\"catalogue\":\"$3\",\"python\":$line}" >> "$RESULTS"
}

for r in $(seq 1 "$ROUNDS"); do
  log "index round $r"
  for cat in emoji photos; do
    manifest=$EMOJI; [[ $cat == photos ]] && manifest=$PHOTO_DIR/manifest.jsonl
    index base-float "$BASE" "$MODEL" $cat "$manifest"
    index float "$CUR" "$MODEL" $cat "$manifest"
    index int8 "$CUR" "$INT8" $cat "$manifest"
    anchor python-float "$MODEL" $cat "$manifest"
    anchor python-ort-int8 "$ORT_INT8" $cat "$manifest"
  done
done

# The served path over the emoji indexes each configuration built (kept from the last round).
serve_load() {
  local name=$1 bin=$2 idx=$3 round=$4 port=$5
  "$bin" serve --index "$idx" --host 127.0.0.1 --port "$port" > "$OUT/runs/serve-$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 200); do
    curl -fsS "http://127.0.0.1:$port/readyz" > /dev/null 2>&1 && break
    sleep 0.2
  done
  $CUR bench-load --addr "127.0.0.1:$port" --manifest "$EMOJI" --seconds "$LOAD_SECONDS" \
    --out "$OUT/runs/load-$name-$round.json" > /dev/null 2>&1 ||
    { kill $pid; cat "$OUT/runs/serve-$name.log" >&2; exit 1; }
  kill $pid; wait $pid 2> /dev/null || true
  log "load $name round $round done"
  echo "{\"kind\":\"load\",\"config\":\"$name\",\"round\":$round,\"result\":$(tr -d '\n' < "$OUT/runs/load-$name-$round.json")}" >> "$RESULTS"
}
for r in $(seq 1 "$ROUNDS"); do
  serve_load base-float "$BASE" "$OUT/runs/idx-base-float-emoji" "$r" 18301
  serve_load float "$CUR" "$OUT/runs/idx-float-emoji" "$r" 18302
  serve_load int8 "$CUR" "$OUT/runs/idx-int8-emoji" "$r" 18303
done

$PY bench/cpu_serving_summary.py "$RESULTS" "$BASE_REV" "$MODEL" "$PHOTOS" "$PHOTO_MB"
