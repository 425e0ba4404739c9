#!/usr/bin/env bash
# Issue 21, part 2: less work for the same front? The demo's earlier configuration (experiment=assistant_study,
# labelled meal-demo) against the same with the cuts in CUT (labelled meal-cut; the default is the demo's
# configuration since this experiment: 100 stage SFT steps instead of 150, a pool of 64 prompts x 4
# instructions instead of 96 x 4, preference-aware LoRA on the upper 15 of the 30 decoder layers only, so that
# every backward pass stops at layer 15), Meal at each of SEEDS, each final front on the 24 validation prompts (the knobs are chosen there;
# the test prompts are for reported fronts). Each configuration builds its conditioning stage once (stage seed
# 0, cached in ~/.cache/meal/conditioning): the first run of a configuration pays it, and its summary says what
# it cost. A run whose front.json exists is kept. Writes docs/results/demo_budget/{compare.json,md,png}.
# Run from the repository root: `bash experiments/demo_budget/run.sh` (e.g. SEEDS=0,1,2, or another CUT).
# Other studies of the same shape: BASE (the overrides both variants start from; default experiment=assistant_study),
# NAME (the experiment's name: runs/NAME, docs/results/NAME) and TITLE, e.g. the demo without SmolLM2's default
# system prompt: NAME=demo_system_prompt BASE=experiment=demo CUT="task.template.system=''".
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
NAME=${NAME:-demo_budget}
OUT=${OUT:-runs/$NAME}
DOCS=${DOCS:-docs/results/$NAME}
BASE=${BASE:-experiment=assistant_study}
TITLE=${TITLE:-The demo against its cut budget (validation prompts; labels: w1)}
SEEDS=${SEEDS:-0,1}
CUT=${CUT:-conditioning.steps=100 conditioning.pool_prompts=64 policy.lora.layers_from=15}
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
start=${START:-$(date +%s)}  # START (epoch seconds): when a resumed experiment first began, for its wall time
runs=()
for seed in ${SEEDS//,/ }; do
  for variant in demo cut; do
    run=$OUT/$variant-s$seed
    read -r -a extra <<< "$BASE"
    [ "$variant" = cut ] && read -r -a more <<< "$CUT" && extra+=("${more[@]}")
    [ -f "$run/front.json" ] || "$BIN/meal-train" "${extra[@]}" "method.name=meal-$variant" "trainer.seed=$seed" \
      trainer.final_eval_split=validation "trainer.out_dir=$run" "hydra.run.dir=$OUT/hydra/$variant-s$seed" \
      logger=none
    runs+=("$run")
  done
done
# the cut's smaller pool gives its own reward normalisation: its fronts again in the demo's units (a copy of the
# run with the demo's reward_stats.json, evaluated by meal-eval on the same validation prompts)
compared=()
for run in "${runs[@]}"; do
  case $run in
    */cut-s*)
      units=$run-demo-units
      if [ ! -f "$units/front.json" ]; then
        rm -rf "$units" && mkdir -p "$units" && cp -r "$run"/{checkpoints,conditioning,config.yaml,metrics.jsonl} "$units"/
        cp "$OUT/demo-s${run##*-s}/reward_stats.json" "$units/reward_stats.json"
        "$BIN/meal-eval" "run_dir=$units" split=validation "out_dir=$units" "hydra.run.dir=$OUT/hydra/eval-${run##*/}"
      fi
      compared+=("$units") ;;
    *) compared+=("$run") ;;
  esac
done
command="SEEDS=$SEEDS bash experiments/demo_budget/run.sh"
[ "$NAME" = demo_budget ] || command="NAME=$NAME BASE=\"$BASE\" CUT=\"$CUT\" $command"
meta=$(BASE="$BASE" CUT="$CUT" COMMAND="$command" "$BIN/python" -c 'import json, os, sys
print(json.dumps({"experiment": sys.argv[1], "split": "validation", "wall_seconds": int(sys.argv[2]), "seeds": sys.argv[3],
                  "base": os.environ["BASE"], "cut": os.environ["CUT"], "command": os.environ["COMMAND"], "code": sys.argv[4]}))' \
  "$NAME" "$(( $(date +%s) - start ))" "$SEEDS" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)")
mkdir -p "$DOCS"
"$BIN/meal-compare" "${compared[@]}" --reference meal-demo --out "$DOCS" --meta "$meta" \
  --title "$TITLE"
