#!/usr/bin/env bash
# A paper task at real scale: Meal and the static baseline over three seeds (a Hydra multirun), each
# run ending with the full evaluation grid on the test split, then meal-compare.
# Needs GPUs and Hub access (Llama-2-7b is gated: `huggingface-cli login` first).
# Run: bash experiments/paper_task.sh reddit_summary|helpful_assistant
#      (env: OUT, SEEDS=0,1,2, LAUNCH=hydra/launcher=slurm_gpu for one Slurm job per run, EXTRA=overrides)
set -euo pipefail
set -f  # EXTRA may hold [lists]: no globbing
TASK=${1:?usage: paper_task.sh reddit_summary|helpful_assistant}
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/$TASK}
SEEDS=${SEEDS:-0,1,2}
"$BIN/meal-train" --multirun "experiment=$TASK" method=meal,static "trainer.seed=$SEEDS" \
  "trainer.out_dir=$OUT/\${method.name}-s\${trainer.seed}" "hydra.sweep.dir=$OUT/multirun" ${LAUNCH:-} ${EXTRA:-}
set +f
"$BIN/meal-compare" "$OUT"/meal-s* "$OUT"/static-s* --out "$OUT/compare"
