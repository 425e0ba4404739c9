"""What the commands (meal-train, meal-eval, meal-generate, meal-export) share: where Hydra finds ``conf/``, one
line and exit code 2 for a mistake in the input, the front they end with, and how a preference is given."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from typing import Any, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from meal.config import ConfigError

CONF_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "conf"))
log = logging.getLogger("meal")


def print_front(summary: dict) -> None:
    """What meal-train and meal-eval end with: the figure, the hypervolume, how well the front follows
    its preferences, and what it cost."""
    from meal.harness.budget import Budget

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
    from meal.harness.checkpoint import CheckpointError, StorageError
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


def launch(app, folder_field: str) -> None:
    """Start a command's Hydra ``app``: meal's schema registered, and a command-line folder ``folder_field``
    that is an existing file refused in one line before Hydra makes its per-launch folder inside it."""
    from meal.config import register_configs

    register_configs()
    refuse_file_folder(sys.argv[1:], folder_field)
    app()


def parse_preferences(value: Any, objectives: Sequence[str]) -> list[list[float]]:
    """``grid`` (the evaluation grid), one preference [w1, ..., wK] or a list of them; ConfigError naming
    what is wrong (length, sign, sum)."""
    from meal.evaluation.front import preference_grid

    k = len(objectives)
    if isinstance(value, str) and value == "grid":
        return preference_grid(k)
    if isinstance(value, (ListConfig, DictConfig)):
        value = OmegaConf.to_container(value)
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"preference: give [w1, ..., w{k}] for {', '.join(objectives)}, a list of them, or grid; "
                          f"got {value!r}")
    prefs = [list(value)] if not isinstance(value[0], (list, tuple)) else [list(v) for v in value]
    for w in prefs:
        if len(w) != k or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in w):
            raise ConfigError(f"preference: {w} has {len(w)} weight(s) for {k} objectives ({', '.join(objectives)})")
        if min(w) < 0 or abs(sum(w) - 1) > 1e-6:
            raise ConfigError(f"preference: {w} is not on the simplex (weights >= 0 summing to 1)")
    return [[float(x) for x in w] for w in prefs]
