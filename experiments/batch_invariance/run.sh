#!/usr/bin/env bash
# Issue 25: does a front depend on the generation batch size? One finished run's checkpoint (RUN, default the
# 5-seed test comparison's static seed 0) evaluated with meal-eval at batch sizes BATCHES (1, 3, 8: the issue's) on its SPLIT prompts
# (24 test prompts x 11 preferences), each into OUT/bs<N>; then check.py counts the responses that differ
# between batch sizes and the hypervolume spread, against the seed-to-seed spread of the comparison (SPREAD_FROM)
# -> DOCS/{compare.json,README.md}. Run from the repository root: `bash experiments/batch_invariance/run.sh`.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
RUN=${RUN:-runs/meta_learner_test/static-s0}
SPLIT=${SPLIT:-test}
BATCHES=${BATCHES:-1 3 8}
OUT=${OUT:-runs/batch_invariance}
SPREAD_FROM=${SPREAD_FROM:-docs/results/meta_learner_test/compare.json}
DOCS=${DOCS:-docs/results/batch_invariance}
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
start=$(date +%s)
for bs in $BATCHES; do
  [ -f "$OUT/bs$bs/front.json" ] && continue
  t0=$(date +%s)
  "$BIN/meal-eval" "run_dir=$RUN" "split=$SPLIT" "batch_size=$bs" "out_dir=$OUT/bs$bs" "hydra.run.dir=$OUT/hydra/bs$bs"
  echo $(( $(date +%s) - t0 )) > "$OUT/bs$bs/seconds"
done
"$BIN/python" experiments/batch_invariance/check.py "$OUT" --batches $BATCHES --spread-from "$SPREAD_FROM" \
  --out "$DOCS" --command "RUN=$RUN SPLIT=$SPLIT BATCHES=\"$BATCHES\" bash experiments/batch_invariance/run.sh" \
  --wall $(( $(date +%s) - start ))
