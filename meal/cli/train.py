"""``meal-train``: the Hydra entry point. Everything below it takes plain arguments (:func:`meal.methods.train`)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from meal.cli import CONF_DIR, launch, print_front, user_errors


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from meal.methods import train

    with user_errors():
        summary = train(cfg)
    if "front_png" in summary:
        print_front(summary)
    return summary.get("hypervolume")  # the sweep objective


def main() -> None:
    launch(_main, "trainer.out_dir")


if __name__ == "__main__":
    main()
