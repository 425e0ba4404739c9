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
# stopped and started again. Rewarded Soups (soups) trains ITERATIONS / 2 GRPO steps per objective: the same
# 384 sampled responses. REUSE=<folder of an earlier SPLIT's runs>: a run missing here whose twin there has its
# checkpoint at ITERATIONS is copied and its front re-evaluated on SPLIT with meal-eval (the training is the
# same command; only trainer.final_eval_split differs), so the learning-curve runs are the final comparison's.
# Run from the repository root: `bash experiments/meta_learner/run.sh` (or `make meta-learner-experiment`);
# e.g. `SEEDS=0,1,2 CONTROL_SEEDS=0 SPLIT=validation`; EXPERIMENT=demo runs the demo's (cut) budget instead of
# experiment=assistant_study's, into runs/meta_learner_demo_$SPLIT and docs/results/meta_learner_demo_$SPLIT;
# CONTROLS="meal_frozen:0,1,2 meal_uniform" gives a control its own seeds. compare.json records the command and the commit of the code that ran.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
SPLIT=${SPLIT:-validation}
EXPERIMENT=${EXPERIMENT:-assistant_study}  # the budget (experiment=demo: the cut demo's stage and adapters)
tag=$([ "$EXPERIMENT" = assistant_study ] || echo "_$EXPERIMENT")
OUT=${OUT:-runs/meta_learner${tag}_$SPLIT}
SEEDS=${SEEDS:-0,1,2}
CONTROL_SEEDS=${CONTROL_SEEDS:-0}
METHODS=${METHODS:-static meal soups}
CONTROLS=${CONTROLS:-meal_frozen meal_uniform meal_shuffled}
ITERATIONS=${ITERATIONS:-12}
EVAL_EVERY=${EVAL_EVERY:-4}
EXTRA=${EXTRA:-}
REUSE=${REUSE:-}
DOCS=${DOCS:-docs/results/meta_learner${tag}_$SPLIT}
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
start=$(date +%s)
train() {  # method seed
  local run="$OUT/$1-s$2" iters=$ITERATIONS src="$REUSE/$1-s$2"
  [ "$1" = soups ] && iters=$(( ITERATIONS / 2 ))
  [ -f "$run/front.json" ] && return 0
  if [ -n "$REUSE" ] && [ -f "$src/checkpoints/step_$(printf %06d "$iters")/state.pt" ]; then
    mkdir -p "$OUT" && rm -rf "$run" && cp -r "$src" "$run" && rm -rf "$run/front.json" "$run/front.png" "$run/responses"
    "$BIN/meal-eval" "run_dir=$run" "split=$SPLIT" "out_dir=$run" "hydra.run.dir=$OUT/hydra/eval-$1-s$2"
    return 0
  fi
  "$BIN/meal-train" "experiment=$EXPERIMENT" "method=$1" "trainer.seed=$2" \
    "trainer.iterations=$iters" "trainer.eval_every=$EVAL_EVERY" "trainer.final_eval_split=$SPLIT" \
    "trainer.out_dir=$run" "hydra.run.dir=$OUT/hydra/$1-s$2" $EXTRA
}
for seed in ${SEEDS//,/ }; do for m in $METHODS; do train "$m" "$seed"; done; done  # one after the other
for c in $CONTROLS; do  # a control may carry its own seeds: meal_frozen:0,1,2
  seeds=$CONTROL_SEEDS; [[ $c == *:* ]] && seeds=${c#*:}
  for seed in ${seeds//,/ }; do train "${c%%:*}" "$seed"; done
done
runs=$(ls -d "$OUT"/*-s* | grep -v hydra)
mkdir -p "$DOCS"
cmd="SPLIT=$SPLIT SEEDS=$SEEDS CONTROL_SEEDS=$CONTROL_SEEDS ITERATIONS=$ITERATIONS EVAL_EVERY=$EVAL_EVERY"
[ "$METHODS" != "static meal soups" ] && cmd="METHODS=\\\"$METHODS\\\" $cmd"
[ -n "$REUSE" ] && cmd="REUSE=$REUSE $cmd"
[ "$EXPERIMENT" != assistant_study ] && cmd="EXPERIMENT=$EXPERIMENT $cmd"
[ "$CONTROLS" != "meal_frozen meal_uniform meal_shuffled" ] && cmd="CONTROLS=\\\"$CONTROLS\\\" $cmd"
[ "$OUT" != "runs/meta_learner${tag}_$SPLIT" ] && cmd="OUT=$OUT $cmd"
[ "$DOCS" != "docs/results/meta_learner${tag}_$SPLIT" ] && cmd="DOCS=$DOCS $cmd"
meta=$(printf '{"experiment": "%s", "split": "%s", "wall_seconds": %d, "seeds": "%s", "control_seeds": "%s", "online_iterations": %d, "command": "%s bash experiments/meta_learner/run.sh", "code": "%s"}' \
  "$(basename "$DOCS")" "$SPLIT" "$(( $(date +%s) - start ))" "$SEEDS" "$CONTROL_SEEDS" "$ITERATIONS" "$cmd" \
  "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)")
"$BIN/meal-compare" $runs --reference static --out "$DOCS" --meta "$meta" \
  --title "Assistant task (experiment=$EXPERIMENT), $SPLIT prompts: ${METHODS// /, } and the net's controls (labels: w1)"
"$BIN/python" experiments/meta_learner/curves.py $runs --out "$DOCS"
