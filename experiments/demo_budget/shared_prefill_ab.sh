#!/usr/bin/env bash
# Issue 21: does the online rollout's shared prompt cache (meal.policy.sampling.shared_prefill: each repeated
# (prompt, preference) reads its prompt once) leave the demo's front as it was? The demo (experiment=demo) at
# each of SEEDS as it runs (labelled meal-demo), and the same with every row reading its own prompt (the function
# replaced by one that shares nothing, labelled meal-unshared), fronts on the 24 validation prompts. In float32
# both sample the same responses (tests/test_preference_lora.py); in bfloat16 the first response token is computed
# as a decode step rather than inside the prompt's pass, whose rounding differs (about as far from the float32
# logits either way), so the draws part after a few tokens and only seeds can say whether the fronts differ.
# Both variants share one conditioning stage (cached in ~/.cache/meal/conditioning). Writes
# docs/results/demo_shared_prefill/{compare.json,md,png}. Run from the repository root:
# `bash experiments/demo_budget/shared_prefill_ab.sh` (e.g. SEEDS=0,1,2).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/demo_shared_prefill}
DOCS=${DOCS:-docs/results/demo_shared_prefill}
SEEDS=${SEEDS:-0,1}
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
start=${START:-$(date +%s)}
unshared='import sys
import meal.policy.sampling as sampling
sampling.shared_prefill = lambda *args: {}  # every row reads its own prompt, as before issue 21
from meal.cli.train import main
sys.argv[0] = "meal-train"
main()'
runs=()
for seed in ${SEEDS//,/ }; do
  for variant in demo unshared; do
    run=$OUT/$variant-s$seed
    args=(experiment=demo "method.name=meal-$variant" "trainer.seed=$seed" trainer.final_eval_split=validation
          "trainer.out_dir=$run" "hydra.run.dir=$OUT/hydra/$variant-s$seed" logger=none)
    if [ ! -f "$run/front.json" ]; then
      if [ "$variant" = demo ]; then "$BIN/meal-train" "${args[@]}"; else "$BIN/python" -c "$unshared" "${args[@]}"; fi
    fi
    runs+=("$run")
  done
done
meta=$(printf '{"experiment": "demo_shared_prefill", "split": "validation", "wall_seconds": %d, "seeds": "%s", "command": "SEEDS=%s bash experiments/demo_budget/shared_prefill_ab.sh", "code": "%s"}' \
  "$(( $(date +%s) - start ))" "$SEEDS" "$SEEDS" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)")
mkdir -p "$DOCS"
"$BIN/meal-compare" "${runs[@]}" --reference meal-demo --out "$DOCS" --meta "$meta" \
  --title "The demo with and without the shared prompt cache (validation prompts; labels: w1)"
