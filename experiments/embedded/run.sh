#!/usr/bin/env bash
# Static rejection sampling vs Meal on the embedded assistant task (helpful vs concise), from one shared
# conditioning stage (the demo's, cached; every online step replays 8 of its labelled rows, as the demo),
# at an equal online budget (ITERATIONS x 8 prompts x 4 samples
# per run; default 12 iterations = 384 sampled responses, as the committed results), SEEDS each (default 0,1,2,3,4), each run followed
# by the full 11-point evaluation on 24 test prompts; the conditioned start and the base policy are
# evaluated the same way. Then meal-compare: hypervolume, MIP, preference-following and cost per method,
# mean ± std, Meal against static by Welch's test and a bootstrap interval. Writes
# docs/results/embedded_assistant/{compare.json, compare.md, compare.png}. Runs go one after the other;
# a run whose front.json exists is kept, so the script can be stopped and started again. Run from the
# repository root: `bash experiments/embedded/run.sh` (or `make embedded-experiment`), e.g.
# `SEEDS=0,1,2 ITERATIONS=12 bash experiments/embedded/run.sh`. About 15 min per run on 2 CPU cores without bf16 (12 iterations).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/embedded}
SEEDS=${SEEDS:-0,1,2,3,4}
ITERATIONS=${ITERATIONS:-12}
DOCS=docs/results/embedded_assistant
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
start=$(date +%s)
for seed in ${SEEDS//,/ }; do
  for method in static meal; do  # one run after the other (2 cores); a run whose front exists is kept
    [ -f "$OUT/$method-s$seed/front.json" ] || "$BIN/meal-train" experiment=assistant_study "method=$method" \
      "trainer.seed=$seed" "trainer.iterations=$ITERATIONS" "trainer.out_dir=$OUT/$method-s$seed"
  done
done
. experiments/embedded/compare.sh
compare_runs "$DOCS" static "Assistant task: static vs Meal from one conditioned start (labels: w1)" \
  "\"online_iterations\": $ITERATIONS" "$OUT"/static-s* "$OUT"/meal-s*
