#!/usr/bin/env bash
# Issue 21: does the loss's cheaper head (meal.policy.losses.per_example_nll: the kept positions' logits by index,
# one matrix product, and the softmax over each position's contiguous row of logits) leave the demo's front as it
# was? The demo at each of SEEDS against the same with the code before it (labelled meal-before: logits_to_keep as
# a count, the cross entropy over the V axis of (B, V, T)), fronts on the 24 validation prompts (ab.sh). The change
# computes the same logits and a cross entropy closer to float64's, so the losses and gradients differ by rounding
# only; it alters the stage's SFT steps too, so the demo variant builds its own stage (DEMO_ARGS: its own cache;
# the pool it samples does not depend on the loss). Writes docs/results/demo_loss_head/.
# Run from the repository root: `bash experiments/demo_budget/loss_head_ab.sh` (e.g. SEEDS=0,1,2,3).
set -euo pipefail
cd "$(dirname "$0")/../.."
export SEEDS=${SEEDS:-0,1}
NAME=demo_loss_head LABEL=before COMMAND="SEEDS=$SEEDS bash experiments/demo_budget/loss_head_ab.sh" \
  DEMO_ARGS="conditioning.cache=runs/demo_loss_head/conditioning" \
  PATCH='import sys
sys.path.insert(0, "experiments/benchmark")
import meal.methods.bilevel, meal.methods.meta_learner, meal.policy.losses
from work_cuts import count_head_nll  # the code before
for module in (meal.policy.losses, meal.methods.bilevel, meal.methods.meta_learner):
    module.per_example_nll = count_head_nll' \
  TITLE="The demo with the loss head by index or by count (validation prompts; labels: w1)" \
  exec bash experiments/demo_budget/ab.sh
