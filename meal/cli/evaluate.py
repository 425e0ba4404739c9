"""``meal-eval``: evaluate the Pareto front of a trained run with its own rewards and normalisation
(:func:`meal.harness.saved_run.evaluate_run`).

For each preference of the grid (K = 2: 11 points, K = 3: 13) the policy generates for every test
prompt with a fixed seed (top_p 0.9, top_k 0, temperature 1); see :mod:`meal.evaluation.front`.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from meal.cli import CONF_DIR, print_front, refuse_file_folder, user_errors
from meal.config import register_configs
from meal.harness.saved_run import EvalOptions, evaluate_run


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def _main(cfg: DictConfig) -> None:
    with user_errors():
        options = EvalOptions(cfg.checkpoint, cfg.untrained, cfg.prompts, cfg.seed, cfg.batch_size, cfg.label,
                              cfg.out_dir, cfg.logger, cfg.stack_on, cfg.split, cfg.trust_run)
        out = evaluate_run(cfg.run_dir, options)
    print_front(out)


def main() -> None:
    register_configs()
    refuse_file_folder(sys.argv[1:], "run_dir")
    _main()


if __name__ == "__main__":
    main()
