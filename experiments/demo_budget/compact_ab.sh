#!/usr/bin/env bash
# Issue 21: does dropping each response from the batch when it ends (meal.policy.sampling.decode, compact) leave
# the demo's front as it was? The demo (experiment=demo) at each of SEEDS as it runs (labelled meal-demo), and the
# same with the ended rows kept in the batch to the last step as Hugging Face's generate keeps them (decode's
# compact=False, labelled meal-keep-ended: the code before 7ab13cb), fronts on the 24 validation prompts. Both
# draw the same responses wherever the rows' logits do not depend on how many rows the batch holds (float32 within
# 4e-5; bf16 bit for bit on the shapes measured, but not on every one), so only seeds say whether the fronts
# differ. Both variants share one conditioning stage (cached in ~/.cache/meal/conditioning). Writes
# docs/results/demo_compact/{compare.json,md,png}. Run from the repository root:
# `bash experiments/demo_budget/compact_ab.sh` (e.g. SEEDS=0,1,2,3).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/demo_compact}
DOCS=${DOCS:-docs/results/demo_compact}
SEEDS=${SEEDS:-0,1}
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
start=${START:-$(date +%s)}
keep_ended='import functools, sys
import meal.policy.sampling as sampling
sampling.decode = functools.partial(sampling.decode, compact=False)  # ended rows stay to the last step
from meal.cli.train import main
sys.argv[0] = "meal-train"
main()'
runs=()
for seed in ${SEEDS//,/ }; do
  for variant in demo keep-ended; do
    run=$OUT/$variant-s$seed
    args=(experiment=demo "method.name=meal-$variant" "trainer.seed=$seed" trainer.final_eval_split=validation
          "trainer.out_dir=$run" "hydra.run.dir=$OUT/hydra/$variant-s$seed" logger=none)
    if [ ! -f "$run/front.json" ]; then
      if [ "$variant" = demo ]; then "$BIN/meal-train" "${args[@]}"; else "$BIN/python" -c "$keep_ended" "${args[@]}"; fi
    fi
    runs+=("$run")
  done
done
meta=$("$BIN/python" -c 'import json, sys; seeds, wall, code = sys.argv[1:]
print(json.dumps({"experiment": "demo_compact", "split": "validation", "wall_seconds": int(wall), "seeds": seeds,
                  "command": f"SEEDS={seeds} bash experiments/demo_budget/compact_ab.sh", "code": code}))' \
  "$SEEDS" "$(( $(date +%s) - start ))" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)")
mkdir -p "$DOCS"
"$BIN/meal-compare" "${runs[@]}" --reference meal-demo --out "$DOCS" --meta "$meta" \
  --title "The demo with ended rows leaving the batch or kept (validation prompts; labels: w1)"
