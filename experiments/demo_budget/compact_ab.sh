#!/usr/bin/env bash
# Issue 21: does dropping each response from the batch when it ends (meal.policy.sampling.decode, compact) leave
# the demo's front as it was? The demo at each of SEEDS against the same with the ended rows kept in the batch to
# the last step as Hugging Face's generate keeps them (decode's compact=False, labelled meal-keep-ended: the code
# before 7ab13cb), fronts on the 24 validation prompts (ab.sh). Both draw the same responses wherever the rows'
# logits do not depend on how many rows the batch holds (float32 within 4e-5; bf16 bit for bit on the shapes
# measured, but not on every one), so only seeds say whether the fronts differ. Writes docs/results/demo_compact/.
# Run from the repository root: `bash experiments/demo_budget/compact_ab.sh` (e.g. SEEDS=0,1,2,3).
set -euo pipefail
cd "$(dirname "$0")/../.."
export SEEDS=${SEEDS:-0,1}
NAME=demo_compact LABEL=keep-ended COMMAND="SEEDS=$SEEDS bash experiments/demo_budget/compact_ab.sh" \
  PATCH='import functools
import meal.policy.sampling as sampling
sampling.decode = functools.partial(sampling.decode, compact=False)  # ended rows stay to the last step' \
  TITLE="The demo with ended rows leaving the batch or kept (validation prompts; labels: w1)" \
  exec bash experiments/demo_budget/ab.sh
