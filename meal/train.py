"""``meal-train``: the Hydra entry point. Everything below it takes plain arguments (trainer.train)."""

from __future__ import annotations

import contextlib
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

    with user_errors():
        summary = train(cfg)
    if "front_png" in summary:
        print_front(summary)
    return summary.get("hypervolume")  # the sweep objective


def print_front(summary: dict) -> None:
    """What meal-train and meal-eval end with: the figure, the hypervolume, how well the front follows
    its preferences, and what it cost."""
    from meal.budget import Budget

    print(f"\nfront: {summary['front_png']}\nhypervolume: {summary['hypervolume']:.4f} "
          f"(reference point {summary['hv_ref']}, normalised units)\n{summary['following']}")
    if summary.get("conditioning_budget"):
        print(f"cost of the conditioning stage: {Budget.from_dict(summary['conditioning_budget']).summary()}")
    if summary.get("budget"):
        print(f"cost of the online stage: {Budget.from_dict(summary['budget']).summary()}")


@contextlib.contextmanager
def user_errors():
    """A mistake in the input (config, data, reward, checkpoint, policy path) ends the program with one
    line that names it and exit code 2; ``HYDRA_FULL_ERROR=1`` shows the traceback instead."""
    from meal.checkpoint import CheckpointError, StorageError
    from meal.rewards import RewardError
    from meal.tasks import DataError

    kinds = {ConfigError: "invalid configuration", DataError: "bad data", RewardError: "bad reward",
             CheckpointError: "bad checkpoint", StorageError: "cannot write"}
    try:
        yield
    except tuple(kinds) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        kind = next(v for k, v in kinds.items() if isinstance(e, k))
        log.error("%s: %s", kind, e)
        print(f"meal: {kind}: {e}  (HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)


def refuse_file_folder(argv: list[str], field: str) -> None:
    """A command-line folder ``field=PATH`` that is an existing file fails here in one line, before Hydra makes
    its per-launch folder inside it (which would end in a NotADirectoryError that names no field)."""
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key == field and os.path.isfile(value):
            print(f"meal: invalid configuration: {field}: {value} is a file, not a folder", file=sys.stderr)
            sys.exit(2)


def main() -> None:
    register_configs()
    refuse_file_folder(sys.argv[1:], "trainer.out_dir")
    _main()


if __name__ == "__main__":
    main()
