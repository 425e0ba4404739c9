"""``meal-train``: the Hydra entry point. Everything below it takes plain arguments (trainer.train)."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from meal.config import ConfigError, register_configs

CONF_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "conf"))
log = logging.getLogger("meal")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from meal.trainer import train

    try:
        summary = train(cfg)
    except ConfigError as e:
        log.error("invalid configuration: %s", e)
        sys.exit(2)
    if "front_png" in summary:
        print(f"\nfront: {summary['front_png']}\nhypervolume: {summary['hypervolume']:.4f} "
              f"(reference point {summary['hv_ref']}, normalised units)")
    return summary.get("hypervolume")  # the sweep objective


def main() -> None:
    register_configs()
    _main()


if __name__ == "__main__":
    main()
