#!/usr/bin/env bash
# `make paper`: the paper's comparison on our data. Trains ce, simclr, supcon, hmc, hce and hmce
# with the same architecture, budget and seed on the emoji catalogue's train split and on
# Fashion-MNIST, evaluates each on seen (train) and unseen (test) products, and writes
# reports/paper.md. Runs whose model.onnx exists are reused (delete runs/paper/X to redo one);
# a run that was interrupted resumes from its checkpoint.
#
# The pretrained part fine-tunes ImageNet-pretrained EfficientNet-Lite0 (`make pretrained`) with
# ce, supcon and hmce on emoji at PRE_SIZE px with PRE_FREEZE units frozen, next to the zero-shot
# backbone (no training) at the same size; its section sits between the `pretrained:` markers.
#
# Budget knobs (environment): EMOJI_STEPS (default 800), FMNIST_STEPS (default 600), SEED (0),
# PRE_STEPS (300), PRE_SIZE (128), PRE_FREEZE (6), PRE_LR (see below).
# PARTS="scratch pretrained study" (default) rebuilds the whole report; PARTS=pretrained or
# PARTS=study only reruns that part and replaces its section of the existing reports/paper.md.
#
# The study (does the hierarchy pay?) is the queue reports/study/queue.tsv run by
# scripts/study.sh: every run of it (loss, seed, split) trained and evaluated on the validation
# hold-out or on seen and unseen products, its evaluations kept in reports/study/NAME/ (committed)
# so a rerun only trains what is missing; then `hiercon eval --study` summarises mean ± std over
# seeds and the differences of STUDY_PAIRS, and docs/paper-study.md (the reading of the numbers)
# follows the tables. STUDY_TRAIN=0 only summarises the runs already finished (while the queue
# runs elsewhere, or to publish part of it).
set -euo pipefail
cd "$(dirname "$0")/.."

HIERCON=${HIERCON:-target/release/hiercon}
EMOJI_STEPS=${EMOJI_STEPS:-800}
FMNIST_STEPS=${FMNIST_STEPS:-600}
SEED=${SEED:-0}
LOSSES=(ce simclr supcon hmc hce hmce)
PRE_STEPS=${PRE_STEPS:-300}
PRE_SIZE=${PRE_SIZE:-128}
PRE_FREEZE=${PRE_FREEZE:-6}
PRE_LR=${PRE_LR:-0.01}
PRE_LOSSES=(ce supcon hmce)
PARTS=${PARTS:-scratch pretrained study}
STUDY_PAIRS=${STUDY_PAIRS:-emoji-hmce,emoji-supcon emoji-fit-hmce,emoji-fit-supcon emoji-fit-hmce-vc8,emoji-fit-hmce emoji-fit-hmce-novar,emoji-fit-hmce emoji-fit-hmce-novar,emoji-fit-supcon emoji-fit-hmce-mix1,emoji-fit-supcon emoji-fit-hmce-mix1,emoji-fit-hmce emoji-fit-hmce-mix1-f4,emoji-fit-supcon-f4 emoji-hmce-mix1-f4,emoji-supcon-f4 fmnist-hmce,fmnist-supcon}
STUDY_TRAIN=${STUDY_TRAIN:-1}
OUT=runs/paper
mkdir -p "$OUT" reports

# evaluate DIR MANIFEST MAX_QUERIES T0 WORKED: DIR/model.onnx on both splits (each report
# reused when present), then the wall seconds since T0 of whatever this call did.
evaluate() {
  local dir=$1 manifest=$2 maxq=$3 t0=$4 worked=$5
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

# run NAME MANIFEST IMAGE_SIZE STEPS MAX_QUERIES LOSS TRAIN FLAGS... (--arch and what it needs)
run() {
  local name=$1 manifest=$2 size=$3 steps=$4 maxq=$5 loss=$6
  shift 6
  local dir=$OUT/$name-$loss
  local t0 worked=0
  t0=$(date +%s)
  if [[ ! -f $dir/model.onnx ]]; then
    worked=1
    local resume=()
    [[ -f $dir/checkpoint.safetensors ]] && resume=(--resume)
    "$HIERCON" train --manifest "$manifest" --loss "$loss" "$@" --image-size "$size" \
      --batch-size 32 --steps "$steps" --seed "$SEED" --checkpoint-every 200 --out "$dir" "${resume[@]}"
  fi
  evaluate "$dir" "$manifest" "$maxq" "$t0" "$worked"
}

has() { [[ " $PARTS " == *" $1 "* ]]; }

# The zero-shot row: the pretrained backbone exported without a head, evaluated like a run.
zero_shot() {
  local dir=$OUT/emoji-lite0-zeroshot
  local t0 worked=0
  t0=$(date +%s)
  mkdir -p "$dir"
  if [[ ! -f $dir/model.onnx ]]; then
    worked=1
    "$HIERCON" export --arch efficientnet-lite0 --no-head --image-size "$PRE_SIZE" --out "$dir/model.onnx" > /dev/null
  fi
  evaluate "$dir" data/emoji/manifest.jsonl "" "$t0" "$worked"
}

PRE_RUNS=("$OUT/emoji-lite0-zeroshot" "${PRE_LOSSES[@]/#/$OUT/emoji-lite0-}")

pretrained_section() {
  echo "<!-- pretrained:begin (scripts/paper.sh writes this section) -->"
  echo "## Emoji from a pretrained start (EfficientNet-Lite0, $PRE_SIZE px, $PRE_FREEZE of 9 units frozen, $PRE_STEPS steps of 32 samples x 2 views, SGD lr $PRE_LR, seed $SEED)"
  echo
  echo "\`emoji-lite0-zeroshot\` is the ImageNet-pretrained backbone's normalised pooled feature with"
  echo "no training at all (\`hiercon export --no-head\`); the other rows fine-tune it with the named"
  echo "loss (stem and the first $(( PRE_FREEZE - 1 )) stages frozen), same budget and seed, and are"
  echo "evaluated through the projection head (\`model.onnx\`)."
  echo
  sed "s/^## /### /" "$OUT/compare-emoji-lite0.md"
  echo
  echo "Wall time (training + evaluation) per run:"
  echo
  for d in "${PRE_RUNS[@]}"; do
    echo "- $(basename "$d"): $(cat "$d/wall-seconds" 2>/dev/null || echo '?') s"
  done
  echo "<!-- pretrained:end -->"
}

if has scratch; then
  for loss in "${LOSSES[@]}"; do run emoji data/emoji/manifest.jsonl 64 "$EMOJI_STEPS" "" "$loss" --arch resnet-mini; done
  for loss in "${LOSSES[@]}"; do run fmnist data/fashion-mnist/manifest.jsonl 28 "$FMNIST_STEPS" 5000 "$loss" --arch resnet-mini; done
fi
if has pretrained; then
  zero_shot
  for loss in "${PRE_LOSSES[@]}"; do
    run emoji-lite0 data/emoji/manifest.jsonl "$PRE_SIZE" "$PRE_STEPS" "" "$loss" \
      --arch efficientnet-lite0 --init pretrained --freeze "$PRE_FREEZE" --lr "$PRE_LR"
  done
  "$HIERCON" eval --compare "${PRE_RUNS[@]}" --report "$OUT/compare-emoji-lite0" > /dev/null
fi

study_section() {
  echo "<!-- study:begin (scripts/paper.sh writes this section) -->"
  echo "## Does the hierarchy pay? hmce against SupCon over seeds"
  echo
  echo "EfficientNet-Lite0 from ImageNet, 128 px, stem + stages 1-5 frozen, SGD lr 0.01, 32 samples x"
  echo "2 views per step; emoji 1,500 steps, Fashion-MNIST 600. Every row is the mean ± sample standard"
  echo "deviation over the seeds it names (a single figure: one seed). Settings are chosen on \`val\` (runs"
  echo "trained on \`fit\`, \`emoji-fit-*\`); \`train\` (seen) and \`test\` (unseen) report runs trained on all"
  echo "seen products. The queue of runs is reports/study/queue.tsv, each run's evaluations are in"
  echo "reports/study/NAME/. Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)."
  echo
  cat reports/study/summary.md
  echo
  [[ -f docs/paper-study.md ]] && cat docs/paper-study.md
  echo "<!-- study:end -->"
}

if has study; then
  if [[ $STUDY_TRAIN != 0 ]]; then scripts/study.sh reports/study/queue.tsv; fi
  pairs=()
  for p in $STUDY_PAIRS; do pairs+=(--pair "$p"); done
  "$HIERCON" eval --study reports/study "${pairs[@]}" --report reports/study/summary > /dev/null
fi

# splice NAME: replace the section between `<!-- NAME:begin` and `<!-- NAME:end -->` of
# reports/paper.md with stdin (appended before "## Wall time" when the report has none yet).
splice() {
  # The section goes through a file: the script itself is python's stdin.
  local section
  section=$(mktemp)
  cat > "$section"
  python3 - "$1" "$section" <<'PY'
import re, sys
name = sys.argv[1]
path = "reports/paper.md"
text = open(path).read()
new = open(sys.argv[2]).read().rstrip("\n")
pattern = re.compile(r"<!-- %s:begin.*?<!-- %s:end -->" % (name, name), re.S)
if pattern.search(text):
    text = pattern.sub(lambda _: new, text)
else:
    marker = "## Wall time"
    text = text.replace(marker, new + "\n\n" + marker, 1) if marker in text else text + "\n" + new + "\n"
open(path, "w").write(text)
PY
  rm -f "$section"
}

if ! has scratch; then
  # Only some sections are new: splice them into the existing report.
  [[ -f reports/paper.md ]] || { echo "reports/paper.md missing: run with PARTS=\"scratch pretrained study\"" >&2; exit 1; }
  if has pretrained; then pretrained_section | splice pretrained; echo "updated the pretrained section of reports/paper.md"; fi
  if has study; then study_section | splice study; echo "updated the study section of reports/paper.md"; fi
  exit 0
fi

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
  if has pretrained; then pretrained_section; echo; fi
  if has study; then study_section; echo; fi
  echo "## Wall time"
  echo
  echo "Training and evaluation of the from-scratch runs took $(( total / 60 )) min in all on $(nproc) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); per run:"
  echo
  for d in "${LOSSES[@]/#/$OUT/emoji-}" "${LOSSES[@]/#/$OUT/fmnist-}"; do
    echo "- $(basename "$d"): $(cat "$d/wall-seconds" 2>/dev/null || echo '?') s"
  done
  echo
  [[ -f docs/paper-findings.md ]] && cat docs/paper-findings.md
} > reports/paper.md
echo "wrote reports/paper.md"
