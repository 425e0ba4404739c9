#!/usr/bin/env bash
# How should the conditioning stage label its rows, and where should the preference enter the policy?
# On the embedded default (SmolLM2-135M, assistant task, helpful vs concise), one shared scored pool,
# then the stage alone (no online iteration) for each labelling rule (region, rank, softmax) with the
# preference in the weights (preference-aware LoRA) and, for each rule, in the prompt only (plain
# LoRA r 16 on q,v, the project's earlier default); plus the base policy. Each front is the 11-point
# grid on 24 test prompts. Writes docs/results/conditioning/{compare.json,compare.md,compare.png}.
# Run from the repository root: `bash experiments/conditioning/run.sh`, or a subset:
# `RUNS="region-weights rank-weights" bash experiments/conditioning/run.sh` (six stages of 150 SFT
# steps and seven evaluations: about 2 hours on 2 CPU cores without bf16; finished runs are kept).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/conditioning}
DOCS=docs/results/conditioning
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
COMMON=(experiment=assistant_study trainer.iterations=0 trainer.eval_every=0 logger=none)
start=${START:-$(date +%s)}  # START (epoch seconds): when a resumed experiment first began, for its wall time
# RUNS picks a subset of the six (LABEL-weights or LABEL-text); the first one is the reference's run
RUNS=${RUNS:-region-weights rank-weights softmax-weights region-text rank-text softmax-text}
runs=()
for name in $RUNS; do
  case $name in
    region-weights | rank-weights | softmax-weights) lora=(policy.lora.preference_aware=true) ;;
    region-text | rank-text | softmax-text)
      lora=(policy.lora.preference_aware=false policy.lora.r=16 policy.lora.alpha=32) ;;
    *) echo "RUNS: unknown run '$name' (expected region|rank|softmax followed by -weights or -text)" >&2; exit 2 ;;
  esac
  [ -f "$OUT/$name/front.json" ] || "$BIN/meal-train" "${COMMON[@]}" conditioning.label=${name%-*} \
    "${lora[@]}" "method.name=$name" "trainer.out_dir=$OUT/$name"
  runs+=("$OUT/$name")
done
# the base policy, evaluated in the same units (the first run's normalisation)
first=${runs[0]}
[ -f "$first/eval-base/front.json" ] || "$BIN/meal-eval" "run_dir=$first" untrained=true label=base
wall=$(( $(date +%s) - start ))
meta=$(printf '{"experiment": "conditioning", "wall_seconds": %d}' "$wall")  # meal-compare adds date and machine
mkdir -p "$DOCS"
"$BIN/meal-compare" "$first/eval-base" "${runs[@]}" --out "$DOCS" --reference base --meta "$meta" \
  --title "Conditioning stage alone: labelling rule x where the preference enters (points labelled with w1)"
