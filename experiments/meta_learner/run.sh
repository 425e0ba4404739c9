#!/usr/bin/env bash
# Does Meal's meta-learner learn, and does it change the front? On the embedded assistant task (helpful vs
# concise), from the demo's shared conditioning stage, at the demo's online budget (ITERATIONS x 8 prompts x 4
# samples): static, Meal (method.md's revised steps 2, 5-9: the default) and the controls that isolate its
# net (meal_frozen: the net at its initialisation; meal_uniform: no net, w_phi uniform; meal_shuffled: the net's
# outputs permuted across the batch's prompts). Every run logs a learning curve (a 3-point grid on 8
# validation prompts every EVAL_EVERY iterations) and the net's diagnostics, and ends with the full 11-point
# front on SPLIT (validation: the 24 prompts held out of training, for choosing knobs; test: the reported
# fronts, once the choices are made). Then meal-compare and the learning curves into DOCS
# (compare.{json,md,png}, curves.{json,png}). A run whose front.json exists is kept, so the script can be
# stopped and started again. Run from the repository root: `bash experiments/meta_learner/run.sh` (or
# `make meta-learner-experiment`); e.g. `SEEDS=0,1,2 CONTROL_SEEDS=0 SPLIT=validation`.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
SPLIT=${SPLIT:-validation}
OUT=${OUT:-runs/meta_learner_$SPLIT}
SEEDS=${SEEDS:-0,1,2}
CONTROL_SEEDS=${CONTROL_SEEDS:-0}
METHODS=${METHODS:-static meal}
CONTROLS=${CONTROLS:-meal_frozen meal_uniform meal_shuffled}
ITERATIONS=${ITERATIONS:-12}
EVAL_EVERY=${EVAL_EVERY:-4}
EXTRA=${EXTRA:-}
DOCS=${DOCS:-docs/results/meta_learner_$SPLIT}
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
start=$(date +%s)
train() {  # method seed
  [ -f "$OUT/$1-s$2/front.json" ] || "$BIN/meal-train" experiment=demo "method=$1" "trainer.seed=$2" \
    "trainer.iterations=$ITERATIONS" "trainer.eval_every=$EVAL_EVERY" "trainer.final_eval_split=$SPLIT" \
    "trainer.out_dir=$OUT/$1-s$2" "hydra.run.dir=$OUT/hydra/$1-s$2" $EXTRA
}
for seed in ${SEEDS//,/ }; do for m in $METHODS; do train "$m" "$seed"; done; done  # one after the other
for seed in ${CONTROL_SEEDS//,/ }; do for m in $CONTROLS; do train "$m" "$seed"; done; done
runs=$(ls -d "$OUT"/*-s* | grep -v hydra)
mkdir -p "$DOCS"
meta=$(printf '{"experiment": "%s", "split": "%s", "wall_seconds": %d, "seeds": "%s", "control_seeds": "%s", "online_iterations": %d, "command": "SPLIT=%s SEEDS=%s CONTROL_SEEDS=%s ITERATIONS=%d EVAL_EVERY=%d bash experiments/meta_learner/run.sh"}' \
  "$(basename "$DOCS")" "$SPLIT" "$(( $(date +%s) - start ))" "$SEEDS" "$CONTROL_SEEDS" "$ITERATIONS" \
  "$SPLIT" "$SEEDS" "$CONTROL_SEEDS" "$ITERATIONS" "$EVAL_EVERY")
"$BIN/meal-compare" $runs --reference static --out "$DOCS" --meta "$meta" \
  --title "Assistant task, $SPLIT prompts: static, Meal and the net's controls (labels: w1)"
"$BIN/python" experiments/meta_learner/curves.py $runs --out "$DOCS"
