#!/usr/bin/env bash
# Issue 21's A/B of a change to the demo's code path: the demo (experiment=demo) at each of SEEDS as it runs
# (labelled meal-demo) against the same with PATCH (Python run in the process before meal-train's main: the code
# without the change; labelled meal-LABEL), fronts on the 24 validation prompts, both variants sharing one
# conditioning stage (cached in ~/.cache/meal/conditioning), unless DEMO_ARGS gives the demo variant more overrides
# (e.g. its own stage cache, `conditioning.cache=...`, for a change that alters the stage's training too: the cache
# key names the configuration, not the code). Writes docs/results/NAME/{compare.json,md,png},
# recording COMMAND (how to regenerate it). Used by shared_prefill_ab.sh and compact_ab.sh; run from the
# repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${NAME:?NAME: the folder of the study under docs/results/}" "${LABEL:?LABEL: the label of the patched variant}"
: "${PATCH:?PATCH: Python that undoes the change}" "${TITLE:?TITLE: the title of the figure}"
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/$NAME}
DOCS=${DOCS:-docs/results/$NAME}
SEEDS=${SEEDS:-0,1}
COMMAND=${COMMAND:-SEEDS=$SEEDS NAME=$NAME LABEL=$LABEL bash experiments/demo_budget/ab.sh}
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
start=${START:-$(date +%s)}
patched="import sys
$PATCH
from meal.cli.train import main
sys.argv[0] = 'meal-train'
main()"
runs=()
for seed in ${SEEDS//,/ }; do
  for variant in demo "$LABEL"; do
    run=$OUT/$variant-s$seed
    args=(experiment=demo "method.name=meal-$variant" "trainer.seed=$seed" trainer.final_eval_split=validation
          "trainer.out_dir=$run" "hydra.run.dir=$OUT/hydra/$variant-s$seed" logger=none)
    [ "$variant" = demo ] && [ -n "${DEMO_ARGS:-}" ] && read -r -a more <<< "$DEMO_ARGS" && args+=("${more[@]}")
    if [ ! -f "$run/front.json" ]; then
      if [ "$variant" = demo ]; then "$BIN/meal-train" "${args[@]}"; else "$BIN/python" -c "$patched" "${args[@]}"; fi
    fi
    runs+=("$run")
  done
done
meta=$("$BIN/python" -c 'import json, sys; name, seeds, wall, command, code = sys.argv[1:]
print(json.dumps({"experiment": name, "split": "validation", "wall_seconds": int(wall), "seeds": seeds,
                  "command": command, "code": code}))' \
  "$NAME" "$SEEDS" "$(( $(date +%s) - start ))" "$COMMAND" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)")
mkdir -p "$DOCS"
"$BIN/meal-compare" "${runs[@]}" --reference meal-demo --out "$DOCS" --meta "$meta" --title "$TITLE"
