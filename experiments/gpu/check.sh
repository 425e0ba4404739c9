#!/usr/bin/env bash
# The prepared GPU check (issue 22): the lent GPU machine runs it in one call, in at most 8 minutes,
# from the repository root; everything it measures goes to $OUT (check.json and check.log).
#
#   on the device:  bash experiments/gpu/check.sh            (carry .whl: the packages that machine lacks)
#   here, on CPU:   bash experiments/gpu/check.sh --dry-run  (the same parts, tiny shapes, under 2 minutes)
#
# Before the call, once: `bash experiments/gpu/wheels.sh` downloads the wheels into .whl/ (ignored by git).
# Parts (experiments/gpu/check.py): a_demo (the demo's pipeline on the device), b_7b_shape (Llama-2-7b's
# shape, bf16, LoRA r 64: generate, virtual / meta step with each engine, real step, checkpointing off and
# on), c_sampling (meal's sampling loop against plain generate). Each is guarded: a failure is recorded and
# the next part runs. Extra arguments go to check.py (--parts a_demo,c_sampling runs a subset).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
DRY=0; case " $* " in *" --dry-run "*) DRY=1;; esac
PY=${PYTHON:-python3}
if [ "$DRY" = 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if [ "$DRY" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then  # hydra-core, omegaconf, antlr4, moocore, vader (wheels.sh)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/meal-site \
    .whl/*.whl || echo "[check] installing the carried wheels failed; the parts that need them will say so"
  export PYTHONPATH=/tmp/meal-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$(pwd):${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
set -o pipefail
timeout 480 "$PY" experiments/gpu/check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/check.log"
