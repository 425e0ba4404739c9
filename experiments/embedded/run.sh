#!/usr/bin/env bash
# Static rejection sampling vs Meal on the embedded assistant task (helpful vs concise), five seeds each,
# from one shared conditioning stage (the demo's, cached), at an equal online budget (20 iterations x
# 8 prompts x 4 samples = 640 sampled responses per run), each followed by the full 11-point evaluation
# on 24 test prompts; the conditioned start and the base policy are evaluated the same way. Then
# meal-compare: hypervolume, MIP, preference-following and cost per method, mean ± std, Meal against
# static by Welch's test and a bootstrap interval. Writes docs/results/embedded_assistant/
# {compare.json, compare.md, compare.png, README.md}. Run from the repository root:
# `bash experiments/embedded/run.sh` (or `make embedded-experiment`); about 70 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/embedded}
SEEDS=${SEEDS:-0,1,2,3,4}
ITERATIONS=${ITERATIONS:-20}
DOCS=docs/results/embedded_assistant
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
start=$(date +%s)
"$BIN/meal-train" --multirun experiment=demo method=static,meal "trainer.seed=$SEEDS" \
  "trainer.iterations=$ITERATIONS" "trainer.out_dir=$OUT/\${method.name}-s\${trainer.seed}" \
  "hydra.sweep.dir=$OUT/multirun"
first=$OUT/meal-s${SEEDS%%,*}
[ -f "$first/eval-conditioned/front.json" ] || "$BIN/meal-eval" "run_dir=$first" checkpoint=conditioned
[ -f "$first/eval-base/front.json" ] || "$BIN/meal-eval" "run_dir=$first" untrained=true label=base
wall=$(( $(date +%s) - start ))
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
meta=$(printf '{"experiment": "embedded_assistant", "date": "%s", "machine": "%s CPU cores (%s), no GPU", "wall_seconds": %d, "seeds": "%s", "online_iterations": %d}' \
  "$(date -u +%Y-%m-%d)" "$(nproc)" "$cpu" "$wall" "$SEEDS" "$ITERATIONS")
mkdir -p "$DOCS"
"$BIN/meal-compare" "$OUT"/static-s* "$OUT"/meal-s* "$first/eval-conditioned" "$first/eval-base" \
  --reference static --out "$DOCS" --meta "$meta" \
  --title "Embedded assistant task: static vs Meal from one conditioned start (points labelled with w1)"
