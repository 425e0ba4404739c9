"""``meal-train``: the Hydra entry point. Everything below it takes plain arguments (:func:`meal.methods.train`)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from meal.cli import CONF_DIR, print_front, refuse_file_folder, user_errors
from meal.config import register_configs


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from meal.methods import train

    with user_errors():
        summary = train(cfg)
    if "front_png" in summary:
        print_front(summary)
    return summary.get("hypervolume")  # the sweep objective


def main() -> None:
    register_configs()
    refuse_file_folder(sys.argv[1:], "trainer.out_dir")
    _main()


if __name__ == "__main__":
    main()
