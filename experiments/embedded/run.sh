#!/usr/bin/env bash
# Static rejection sampling vs Meal on the embedded assistant task (helpful vs concise), three seeds
# each, at an equal budget of sampled responses (the demo's: 30 iterations x 8 prompts x 4 samples
# = 960 responses per run), each followed by the full 11-point evaluation on 24 test prompts;
# then meal-compare. Writes docs/results_embedded.md (table, date, machine, wall time) and the
# figure docs/compare_embedded.png. Run from the repository root: `bash experiments/embedded/run.sh`
# (or `make embedded-experiment`). About an hour on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/embedded}
SEEDS=${SEEDS:-0,1,2}
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
start=$(date +%s)
"$BIN/meal-train" --multirun experiment=demo method=static,meal "trainer.seed=$SEEDS" \
  trainer.eval_every=0 "trainer.out_dir=$OUT/\${method.name}-s\${trainer.seed}" \
  "hydra.sweep.dir=$OUT/multirun"
wall=$(( $(date +%s) - start ))
mkdir -p docs
"$BIN/meal-compare" "$OUT"/static-s* "$OUT"/meal-s* --out "$OUT/compare" \
  --title "Embedded assistant task: static vs Meal (points labelled with w1)"
cp "$OUT/compare/compare.png" docs/compare_embedded.png
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
{
  echo "# Embedded task: static rejection sampling vs Meal"
  echo
  echo "Run by \`experiments/embedded/run.sh\` on $(date -u +%Y-%m-%d), $(nproc) CPU cores ($cpu), no GPU;"
  echo "wall time $((wall / 60)) min for the six training runs and their evaluations."
  echo "Setting: \`experiment=demo\` (SmolLM2-135M-Instruct + LoRA, helpful vs concise, 30 iterations of"
  echo "8 prompts x 4 samples: 960 sampled responses per run, the same for both methods), seeds $SEEDS,"
  echo "evaluated on the 11-point grid over 24 test prompts. Whatever it shows is the result; nothing was"
  echo "tuned for the comparison."
  echo
  cat "$OUT/compare/compare.md"
  echo
  echo "![fronts](compare_embedded.png)"
} > docs/results_embedded.md
cat docs/results_embedded.md
