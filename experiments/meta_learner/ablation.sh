#!/usr/bin/env bash
# The paper's ablation knobs (its Figures 5 and 6) on validation prompts: lam in {1, 0.5, 0.3, 0.2} and the
# temperature tau of the hindsight label softmax(R / tau) (method.md step 5) in {0.5, 1, 2}, at lam 0.5. Same task,
# conditioning stage, budget and run folder as the pilot (experiments/meta_learner/run.sh, SPLIT=validation), so
# its runs count: lam 1 is static-s*, (lam 0.5, tau 1) is meal-s*. A run whose front.json exists is kept (the
# script can be stopped and started again). Then meal-compare of every variant into DOCS.
# Run from the repository root: `bash experiments/meta_learner/ablation.sh` (or `make meta-learner-ablation`).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/meta_learner_validation}
SEEDS=${SEEDS:-0,1}  # of lam 1 (static) and lam 0.5 (meal): the pilot's runs
VARIANT_SEEDS=${VARIANT_SEEDS:-$SEEDS}  # of the other variants
ITERATIONS=${ITERATIONS:-12}
EVAL_EVERY=${EVAL_EVERY:-4}
DOCS=${DOCS:-docs/results/meta_learner_validation/ablation}
# name=method and its overrides (a comma-free list); static and meal are the pilot's runs
VARIANTS=${VARIANTS:-"meal_lam0.3=method.lam=0.3 meal_lam0.2=method.lam=0.2 meal_tau0.5=method.tau=0.5 meal_tau2=method.tau=2.0"}
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
start=$(date +%s)
train() {  # name seed overrides...
  local name=$1 seed=$2 method=meal; shift 2
  [ "$name" = static ] && method=static
  [ -f "$OUT/$name-s$seed/front.json" ] && return 0
  "$BIN/meal-train" experiment=assistant_study "method=$method" "method.name=$name" "$@" "trainer.seed=$seed" \
    "trainer.iterations=$ITERATIONS" "trainer.eval_every=$EVAL_EVERY" "trainer.final_eval_split=validation" \
    "trainer.out_dir=$OUT/$name-s$seed" "hydra.run.dir=$OUT/hydra/$name-s$seed"
}
runs=""
for seed in ${SEEDS//,/ }; do
  train static "$seed"; train meal "$seed"
  runs="$runs $OUT/static-s$seed $OUT/meal-s$seed"
done
for seed in ${VARIANT_SEEDS//,/ }; do
  for v in $VARIANTS; do
    train "${v%%=*}" "$seed" "${v#*=}"
    runs="$runs $OUT/${v%%=*}-s$seed"
  done
done
mkdir -p "$DOCS"
meta=$(printf '{"experiment": "lam and tau ablation", "split": "validation", "wall_seconds": %d, "seeds": "%s", "online_iterations": %d, "command": "SEEDS=%s VARIANT_SEEDS=%s ITERATIONS=%d bash experiments/meta_learner/ablation.sh (lam 1 = static, lam 0.5 tau 1 = meal)", "code": "%s"}' \
  "$(( $(date +%s) - start ))" "$SEEDS" "$ITERATIONS" "$SEEDS" "$VARIANT_SEEDS" "$ITERATIONS" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)")
"$BIN/meal-compare" $runs --reference static --out "$DOCS" --meta "$meta" \
  --title "Assistant task, validation prompts: lam (1 = static, 0.5 = Meal, 0.3, 0.2) and tau (0.5, 1, 2) (labels: w1)"
