#!/usr/bin/env bash
# Issue 21: does the online rollout's shared prompt cache (meal.policy.sampling.shared_prefill: each repeated
# (prompt, preference) reads its prompt once) leave the demo's front as it was? The demo at each of SEEDS against
# the same with every row reading its own prompt (the function replaced by one that shares nothing, labelled
# meal-unshared), fronts on the 24 validation prompts (ab.sh). In float32 both sample the same responses
# (tests/test_preference_lora.py); in bfloat16 the first response token is computed as a decode step rather than
# inside the prompt's pass, whose rounding differs (about as far from the float32 logits either way), so the draws
# part after a few tokens and only seeds can say whether the fronts differ. Writes docs/results/demo_shared_prefill/.
# Run from the repository root: `bash experiments/demo_budget/shared_prefill_ab.sh` (e.g. SEEDS=0,1,2).
set -euo pipefail
cd "$(dirname "$0")/../.."
export SEEDS=${SEEDS:-0,1}
NAME=demo_shared_prefill LABEL=unshared COMMAND="SEEDS=$SEEDS bash experiments/demo_budget/shared_prefill_ab.sh" \
  PATCH='import meal.policy.sampling as sampling
sampling.shared_prefill = lambda *args: {}  # every row reads its own prompt, as before issue 21' \
  TITLE="The demo with and without the shared prompt cache (validation prompts; labels: w1)" \
  exec bash experiments/demo_budget/ab.sh
