"""``meal-eval``: evaluate the Pareto front of a trained run with its own rewards and normalisation
(:func:`meal.harness.saved_run.evaluate_run`).

For each preference of the grid (K = 2: 11 points, K = 3: 13) the policy generates for every test
prompt with a fixed seed (top_p 0.9, top_k 0, temperature 1); see :mod:`meal.evaluation.front`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from meal.cli import CONF_DIR, launch, print_front, user_errors
from meal.harness.saved_run import EvalOptions, evaluate_run


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def _main(cfg: DictConfig) -> None:
    with user_errors():
        options = EvalOptions(checkpoint=cfg.checkpoint, untrained=cfg.untrained, prompts=cfg.prompts, seed=cfg.seed,
                              batch_size=cfg.batch_size, label=cfg.label, out_dir=cfg.out_dir, logger_cfg=cfg.logger,
                              stack_on=cfg.stack_on, split=cfg.split, trust=cfg.trust_run)
        out = evaluate_run(cfg.run_dir, options)
    print_front(out)


def main() -> None:
    launch(_main, "run_dir")


if __name__ == "__main__":
    main()
