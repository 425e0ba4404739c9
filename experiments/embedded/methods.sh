#!/usr/bin/env bash
# The five methods side by side on the embedded assistant task (helpful vs concise), every one from the
# shared conditioning stage (RiC from its own stage: the same pool labelled with scores, plain LoRA) and with
# the same online budget of sampled responses: static and Meal 12 iterations x 8 prompts x 4 samples = 384;
# RiC 12 iterations (384); MORLHF 3 grid policies x 4 GRPO steps x 8 x 4 = 384; Rewarded Soups 2 policies x 6
# x 8 x 4 = 384. SEEDS each (default 0,1,2); each run ends with the 11-point evaluation on 24 test prompts.
# MetaAligner (METAALIGNER=1, the default) samples nothing online: its corrector trains on pairs of the
# conditioning corpus and is evaluated stacked on the base policy and on the seed's Meal run.
# Static and Meal runs are those of experiments/embedded/run.sh when OUT is the same folder (a run whose
# front.json exists is kept, so the script can be stopped and started again). Then meal-compare with Meal as
# the reference: docs/results/embedded_methods/{compare.json, compare.md, compare.png}, and every run's
# per-preference responses and scores as CSV in RiC's layout (<run>/responses/). Run from the repository
# root: `OUT=runs/embedded_replay bash experiments/embedded/methods.sh`. About 15 min per run on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/embedded}
SEEDS=${SEEDS:-0,1,2}
METHODS=${METHODS:-static meal ric morlhf soups}
DOCS=docs/results/embedded_methods
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
declare -A ITERS=([static]=12 [meal]=12 [ric]=12 [morlhf]=4 [soups]=6)
start=$(date +%s)
for seed in ${SEEDS//,/ }; do
  for method in $METHODS; do  # one run after the other (2 cores)
    [ -f "$OUT/$method-s$seed/front.json" ] || "$BIN/meal-train" experiment=assistant_study "method=$method" \
      "trainer.seed=$seed" "trainer.iterations=${ITERS[$method]}" "trainer.out_dir=$OUT/$method-s$seed"
  done
done
# MetaAligner: its corrector trained per seed on pairs of the same corpus (90 steps), evaluated stacked on the
# base policy (its own front) and on that seed's Meal run (meal-eval stack_on=...)
if [ "${METAALIGNER:-1}" = 1 ]; then
  for seed in ${SEEDS//,/ }; do
    [ -f "$OUT/metaaligner-s$seed/front.json" ] || "$BIN/meal-train" experiment=assistant_study method=metaaligner \
      'method.zero_shot=[positive]' method.stack_on=base "trainer.seed=$seed" "trainer.out_dir=$OUT/metaaligner-s$seed"
    [ -f "$OUT/metaaligner-s$seed/eval-on-meal-s$seed/front.json" ] || "$BIN/meal-eval" \
      "run_dir=$OUT/metaaligner-s$seed" "stack_on=$OUT/meal-s$seed" prompts=24 'label=metaaligner on meal'
  done
fi
runs=()
for method in $METHODS; do runs+=("$OUT"/$method-s*); done
[ "${METAALIGNER:-1}" = 1 ] && runs+=("$OUT"/metaaligner-s* "$OUT"/metaaligner-s*/eval-on-meal-s*)
. experiments/embedded/compare.sh
compare_runs "$DOCS" meal "Assistant task: five methods from one conditioned start, 384 sampled responses each" \
  '"online_sampled_responses": 384' "${runs[@]}"
