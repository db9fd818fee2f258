#!/usr/bin/env bash
# `make bench-index`: hiercon's index and faiss IndexHNSWFlat side by side on the same vectors.
#   BENCH_INDEX_N (default 1000000) clustered synthetic vectors of width 128, M in BENCH_INDEX_M
#   (default "16 32"), ef_construction BENCH_INDEX_EFC (default 200, hiercon's default) for both;
#   the nightly re-index (unchanged, 1 % changed) runs on the first M's index before the other M;
#   then, if index/emoji
#   has a live generation, the same comparison on its embeddings.
# Results: bench/results/index-side-by-side.{md,json}, bench/results/index-nightly-<N>.json.
set -euo pipefail
N=${BENCH_INDEX_N:-1000000}
MS=${BENCH_INDEX_M:-16 32}
EFC=${BENCH_INDEX_EFC:-200}
THREADS=${BENCH_INDEX_THREADS:-$(nproc)}
PY=${BENCH_PYTHON:-.cache/bench-venv/bin/python}
BIN=target/release/examples/bench_index
WORK=.cache/bench-index
OUT=bench/results
mkdir -p "$WORK" "$OUT"
results=()

side_by_side() { # data dir, tag
  local d=$1 tag=$2
  for m in $MS; do
    "$PY" bench/index_side_by_side.py faiss --dir "$d" --m "$m" --ef-construction "$EFC" --threads "$THREADS" \
      --out "$WORK/$tag-faiss-m$m.json"
    results+=("$WORK/$tag-faiss-m$m.json")
    local idx="$WORK/index-$tag-m$m"
    RAYON_NUM_THREADS=$THREADS "$BIN" build --dir "$d" --index "$idx" --m "$m" --ef-construction "$EFC" \
      --out "$WORK/$tag-hiercon-m$m-build.json"
    "$BIN" graph-rss --index "$idx" --out "$WORK/$tag-hiercon-m$m-graph.json"
    RAYON_NUM_THREADS=1 "$BIN" query --dir "$d" --index "$idx" --build "$WORK/$tag-hiercon-m$m-build.json" \
      --graph-rss "$WORK/$tag-hiercon-m$m-graph.json" --out "$WORK/$tag-hiercon-m$m.json"
    results+=("$WORK/$tag-hiercon-m$m.json")
    "$PY" bench/index_side_by_side.py table --out-md "$OUT/index-side-by-side.md" \
      --out-json "$OUT/index-side-by-side.json" "${results[@]}" > /dev/null
  done
}

syn="$WORK/synthetic-$N"
[ -f "$syn/truth.json" ] || "$PY" bench/index_side_by_side.py data --dir "$syn" --n "$N"
all_m=$MS
first_m=${MS%% *}
MS=$first_m side_by_side "$syn" "synthetic-$N"
RAYON_NUM_THREADS=$THREADS "$BIN" nightly --dir "$syn" --index "$WORK/index-synthetic-$N-m$first_m" \
  --out "$OUT/index-nightly-$N.json"
MS=${all_m#"$first_m"} side_by_side "$syn" "synthetic-$N"

if [ -f index/emoji/CURRENT ]; then
  emoji="$WORK/emoji"
  "$PY" bench/index_side_by_side.py emoji --dir "$emoji" \
    --embeddings "index/emoji/$(cat index/emoji/CURRENT)/embeddings.safetensors"
  MS=16 side_by_side "$emoji" emoji
fi
"$PY" bench/index_side_by_side.py table --out-md "$OUT/index-side-by-side.md" \
  --out-json "$OUT/index-side-by-side.json" "${results[@]}"
