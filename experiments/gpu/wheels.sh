#!/usr/bin/env bash
# The packages meal imports that the lent GPU machine (Python 3.12, torch, transformers, peft, accelerate,
# scipy, matplotlib; no Hub, no registry) lacks, as wheels in .whl/ (ignored by git, about 1.8 MB), for
# experiments/gpu/check.sh to install there: `run` with carry [".whl"].
set -eu
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  hydra-core==1.3.8 omegaconf==2.3.1 moocore==0.3.2 cffi==2.1.1 pycparser==2.23 platformdirs==4.14.9 \
  vaderSentiment==3.3.2
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # an sdist on PyPI: a pure-Python wheel here
ls -la .whl
