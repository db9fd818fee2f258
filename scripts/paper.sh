#!/usr/bin/env bash
# `make paper`: the paper's comparison on our data. Trains ce, simclr, supcon, hmc, hce and hmce
# with the same architecture, budget and seed on the emoji catalogue's train split and on
# Fashion-MNIST, evaluates each on seen (train) and unseen (test) products, and writes
# reports/paper.md. Runs whose model.onnx exists are reused (delete runs/paper/X to redo one);
# a run that was interrupted resumes from its checkpoint.
#
# Budget knobs (environment): EMOJI_STEPS (default 800), FMNIST_STEPS (default 600), SEED (0).
set -euo pipefail
cd "$(dirname "$0")/.."

HIERCON=${HIERCON:-target/release/hiercon}
EMOJI_STEPS=${EMOJI_STEPS:-800}
FMNIST_STEPS=${FMNIST_STEPS:-600}
SEED=${SEED:-0}
LOSSES=(ce simclr supcon hmc hce hmce)
OUT=runs/paper
mkdir -p "$OUT" reports

# run NAME MANIFEST IMAGE_SIZE STEPS MAX_QUERIES LOSS
run() {
  local name=$1 manifest=$2 size=$3 steps=$4 maxq=$5 loss=$6
  local dir=$OUT/$name-$loss
  local t0 worked=0
  t0=$(date +%s)
  if [[ ! -f $dir/model.onnx ]]; then
    worked=1
    local resume=()
    [[ -f $dir/checkpoint.safetensors ]] && resume=(--resume)
    "$HIERCON" train --manifest "$manifest" --loss "$loss" --arch resnet-mini --image-size "$size" \
      --batch-size 32 --steps "$steps" --seed "$SEED" --checkpoint-every 200 --out "$dir" "${resume[@]}"
  fi
  for split in train test; do
    if [[ ! -f $dir/eval-$split.json ]]; then
      worked=1
      "$HIERCON" eval --model "$dir/model.onnx" --manifest "$manifest" --split "$split" \
        ${maxq:+--max-queries "$maxq"} --seed "$SEED" --report "$dir/eval-$split" > /dev/null
    fi
  done
  # Wall seconds of this run's training + evaluation, kept when a later call reuses the run.
  if (( worked )); then echo $(( $(date +%s) - t0 )) > "$dir/wall-seconds"; fi
}

for loss in "${LOSSES[@]}"; do run emoji data/emoji/manifest.jsonl 64 "$EMOJI_STEPS" "" "$loss"; done
for loss in "${LOSSES[@]}"; do run fmnist data/fashion-mnist/manifest.jsonl 28 "$FMNIST_STEPS" 5000 "$loss"; done

"$HIERCON" eval --compare "${LOSSES[@]/#/$OUT/emoji-}" --report "$OUT/compare-emoji" > /dev/null
"$HIERCON" eval --compare "${LOSSES[@]/#/$OUT/fmnist-}" --report "$OUT/compare-fmnist" > /dev/null
total=0
for d in "${LOSSES[@]/#/$OUT/emoji-}" "${LOSSES[@]/#/$OUT/fmnist-}"; do
  total=$(( total + $(cat "$d/wall-seconds" 2>/dev/null || echo 0) ))
done

{
  cat docs/paper-head.md
  echo
  echo "## Emoji (resnet-mini, 64 px, $EMOJI_STEPS steps of 32 samples x 2 views, seed $SEED)"
  echo
  sed "s/^## /### /" "$OUT/compare-emoji.md"
  echo
  echo "## Fashion-MNIST (resnet-mini, 28 px, $FMNIST_STEPS steps of 32 samples x 2 views, seed $SEED; at most 5000 queries per split)"
  echo
  sed "s/^## /### /" "$OUT/compare-fmnist.md"
  echo
  echo "## Wall time"
  echo
  echo "Training and evaluation took $(( total / 60 )) min in all on $(nproc) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); per run:"
  echo
  for d in "${LOSSES[@]/#/$OUT/emoji-}" "${LOSSES[@]/#/$OUT/fmnist-}"; do
    echo "- $(basename "$d"): $(cat "$d/wall-seconds" 2>/dev/null || echo '?') s"
  done
  echo
  [[ -f docs/paper-findings.md ]] && cat docs/paper-findings.md
} > reports/paper.md
echo "wrote reports/paper.md"
