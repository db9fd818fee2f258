#!/usr/bin/env bash
# The loss study of `make paper` (reports/paper.md, "Does the hierarchy pay?"): trains and
# evaluates every run of a queue file, in order, resumably.
#
#   scripts/study.sh [QUEUE]        (default reports/study/queue.tsv)
#
# A queue line is tab-separated: NAME  MANIFEST  TRAIN_SPLIT  EVAL_SPLITS  TRAIN_FLAGS...
#   NAME         runs/study/NAME holds the run (checkpoints, models: git-ignored); its results go to
#                reports/study/NAME/ (committed): config.json, eval-<split>.json for the head
#                (model.onnx) and eval-backbone-<split>.json for the backbone feature
#                (backbone.onnx), train.json (steps, wall seconds, machine).
#   TRAIN_SPLIT  train (all seen products) or fit (seen minus the validation hold-out); `-` for
#                the zero-shot row (no training: the pretrained backbone, TRAIN_FLAGS passed to
#                `hiercon export --no-head`).
#   EVAL_SPLITS  comma-separated: train,test for reported runs, val for runs that choose settings.
#   TRAIN_FLAGS  the rest of the `hiercon train` command line (loss, arch, seed, steps, ...).
# Lines starting with # are comments. A run whose reports/study/NAME/done exists is skipped; an
# interrupted run resumes from its checkpoint; an evaluation already written is kept, so the
# queue can be stopped at any time and started again, and lines can be added while it runs
# (the file is read line by line).
set -euo pipefail
cd "$(dirname "$0")/.."

HIERCON=${HIERCON:-target/release/hiercon}
QUEUE=${1:-reports/study/queue.tsv}
RUNS=runs/study
RESULTS=reports/study
mkdir -p "$RUNS" "$RESULTS"

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)

# eval_flags MANIFEST: Fashion-MNIST's splits are large and leave-one-out: a seeded sample of
# 5,000 queries (the gallery stays whole), as reports/paper.md has always used.
eval_flags() {
  case $1 in
    *fashion-mnist*) echo "--max-queries 5000" ;;
    *) echo "" ;;
  esac
}

while IFS=$'\t' read -r name manifest train_split eval_splits flags; do
  [[ -z ${name// } || $name == \#* ]] && continue
  out=$RUNS/$name
  res=$RESULTS/$name
  if [[ -f $res/done ]]; then continue; fi
  mkdir -p "$out" "$res"
  echo "== $name ($(date -u +%H:%M:%S))"
  t0=$(date +%s)
  read -r -a extra <<< "$flags"
  if [[ $train_split == - ]]; then
    [[ -f $out/model.onnx ]] || "$HIERCON" export --no-head "${extra[@]}" --out "$out/model.onnx" > /dev/null
  elif [[ ! -f $out/model.onnx ]]; then
    resume=()
    [[ -f $out/checkpoint.safetensors ]] && resume=(--resume)
    "$HIERCON" train --manifest "$manifest" --split "$train_split" "${extra[@]}" --out "$out" "${resume[@]}"
  fi
  t1=$(date +%s)
  IFS=, read -r -a splits <<< "$eval_splits"
  for split in "${splits[@]}"; do
    models=(model)
    [[ -f $out/backbone.onnx ]] && models+=(backbone)
    for m in "${models[@]}"; do
      prefix=eval-$split
      [[ $m == backbone ]] && prefix=eval-backbone-$split
      if [[ ! -f $res/$prefix.json ]]; then
        # shellcheck disable=SC2046
        "$HIERCON" eval --model "$out/$m.onnx" --manifest "$manifest" --split "$split" $(eval_flags "$manifest") \
          --report "$out/$prefix" > /dev/null
        cp "$out/$prefix.json" "$res/$prefix.json"
      fi
    done
  done
  t2=$(date +%s)
  [[ -f $out/config.json ]] && cp "$out/config.json" "$res/config.json"
  train_seconds=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["training"]["seconds"])' "$out/model.json" 2>/dev/null || echo null)
  cat > "$res/train.json" <<JSON
{"name": "$name", "manifest": "$manifest", "train_split": "$train_split", "eval_splits": "$eval_splits",
 "flags": "$flags", "train_seconds": $train_seconds, "wall_seconds_this_call": {"train": $((t1 - t0)), "eval": $((t2 - t1))},
 "machine": "$(nproc) cores, $cpu"}
JSON
  touch "$res/done"
  echo "== $name done: train $((t1 - t0)) s, eval $((t2 - t1)) s"
done < "$QUEUE"
echo "queue $QUEUE finished"
