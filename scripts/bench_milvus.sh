#!/usr/bin/env bash
# `make bench-milvus`: the vectors of `make bench-index` through hiercon's local index and through
# Milvus 2.3.5 (standalone, this machine) in one run, then the emoji HTTP load test against
# `hiercon serve --index` and `hiercon serve --milvus`.
#   BENCH_MILVUS_N (default 1000000) clustered vectors of width 128, M 16, ef_construction 200.
# Then the nightly re-index into Milvus: a small change applied to the standby collection against a
# new collection (bench/milvus_nightly.py -> bench/results/milvus-nightly.{md,json}).
# Results: bench/results/milvus-side-by-side.{md,json} (and the per-side files in .cache/bench-milvus).
# Resumable: a side whose result file exists is not run again (BENCH_MILVUS_FRESH=1 reruns all).
set -euo pipefail
N=${BENCH_MILVUS_N:-1000000}
M=${BENCH_MILVUS_M:-16}
EFC=${BENCH_MILVUS_EFC:-200}
THREADS=${BENCH_MILVUS_THREADS:-$(nproc)}
PY=${BENCH_PYTHON:-.cache/bench-venv/bin/python}
VPY=${VENV_PYTHON:-.cache/venv/bin/python}
WORK=.cache/bench-milvus
OUT=bench/results
SERVER="$WORK/server"
mkdir -p "$WORK" "$OUT"
stop() { "$VPY" scripts/milvus.py stop --data "$SERVER" || true; }
trap stop EXIT

syn=".cache/bench-index/synthetic-$N"
[ -f "$syn/truth.json" ] || "$PY" bench/index_side_by_side.py data --dir "$syn" --n "$N"

[ -z "${BENCH_MILVUS_FRESH:-}" ] || rm -f "$WORK/local-$N.json" "$WORK/milvus-$N.json" "$WORK"/load-*.json

# hiercon's local index: the full `hiercon index` build path, then its serving figures.
idx="$WORK/index-$N-m$M"
if [ ! -f "$WORK/local-$N.json" ]; then
rm -rf "$idx"
RAYON_NUM_THREADS=$THREADS target/release/examples/bench_index build --dir "$syn" --index "$idx" --m "$M" \
  --ef-construction "$EFC" --out "$WORK/local-$N-build.json"
target/release/examples/bench_index graph-rss --index "$idx" --out "$WORK/local-$N-graph.json"
RAYON_NUM_THREADS=1 target/release/examples/bench_index query --dir "$syn" --index "$idx" \
  --build "$WORK/local-$N-build.json" --graph-rss "$WORK/local-$N-graph.json" --out "$WORK/local-$N.json"
rm -rf "$idx"
fi

# Milvus: a fresh server of its own.
stop
rm -rf "$SERVER"
addr=$("$VPY" scripts/milvus.py start --data "$SERVER" --watch $$)
[ -f "$WORK/milvus-$N.json" ] || target/release/examples/bench_milvus --dir "$syn" --address "$addr" \
  --data "$SERVER" --m "$M" --ef-construction "$EFC" --out "$WORK/milvus-$N.json"

# The nightly re-index: a change applied to the standby collection against a new collection,
# through `hiercon index --milvus` (bench/milvus_nightly.py; BENCH_MILVUS_NIGHTLY_N rows, default 100k).
NIGHTLY_N=${BENCH_MILVUS_NIGHTLY_N:-100000}
[ -n "${BENCH_MILVUS_FRESH:-}" ] && rm -f "$WORK/nightly-$NIGHTLY_N.done"
if [ ! -f "$WORK/nightly-$NIGHTLY_N.done" ]; then
  "$PY" bench/milvus_nightly.py --hiercon target/release/hiercon --address "$addr" \
    --work "$WORK/nightly-$NIGHTLY_N" --n "$NIGHTLY_N" \
    --out-json "$OUT/milvus-nightly.json" --out-md "$OUT/milvus-nightly.md"
  touch "$WORK/nightly-$NIGHTLY_N.done"
fi

# The emoji HTTP load test with each backend (same model, same queries, same server flags).
loads=()
if [ -f index/emoji/CURRENT ]; then
  gen="index/emoji/$(cat index/emoji/CURRENT)"
  model=$("$VPY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["model"]["path"])' "$gen/generation.json")
  target/release/hiercon bench-load --index index/emoji --manifest data/emoji/manifest.jsonl \
    --out "$WORK/load-local.json"
  target/release/hiercon index --milvus "$addr" --collection bench_emoji --manifest data/emoji/manifest.jsonl \
    --model "$model"
  target/release/hiercon serve --milvus "$addr" --collection bench_emoji --port 0 > "$WORK/serve.out" 2> "$WORK/serve.err" &
  serve_pid=$!
  for _ in $(seq 600); do grep -q "listening on" "$WORK/serve.out" && break; sleep 0.1; done
  serve_addr=$(sed -n 's|listening on http://||p' "$WORK/serve.out")
  target/release/hiercon bench-load --addr "$serve_addr" --manifest data/emoji/manifest.jsonl \
    --out "$WORK/load-milvus.json"
  kill "$serve_pid"; wait "$serve_pid" || true
  loads=(--load-local "$WORK/load-local.json" --load-milvus "$WORK/load-milvus.json")
else
  echo "bench-milvus: index/emoji has no live generation (make demo builds it): no HTTP load test" >&2
fi
"$PY" bench/milvus_side_by_side.py --local "$WORK/local-$N.json" --milvus "$WORK/milvus-$N.json" "${loads[@]}" \
  --out-md "$OUT/milvus-side-by-side.md" --out-json "$OUT/milvus-side-by-side.json"
