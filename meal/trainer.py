"""Below the CLI: the configuration made typed and checked, then the method's recipe.

Each method is one module of :mod:`meal.methods` (its ``train(cfg)`` reads top to bottom over the
shared harness, :mod:`meal.harness`), one YAML of ``conf/method/`` naming it as ``recipe`` and one
schema in :mod:`meal.config`.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from meal.config import TrainConfig, validate
from meal.run_folder import run_lock
from meal.methods import recipe


def as_config(cfg: Any) -> DictConfig:
    """Merge a (partial) config onto the typed schema, so tests can pass plain dicts."""
    if not isinstance(cfg, DictConfig) or OmegaConf.get_type(cfg) is dict:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
    OmegaConf.resolve(cfg)  # freeze interpolations (e.g. a timestamped out_dir) once
    return cfg


def train(cfg: Any) -> dict[str, Any]:
    """Train as configured (``method.recipe`` picks the recipe); returns a summary of the run."""
    cfg = as_config(cfg)
    validate(cfg)  # also types cfg.method by its recipe's schema
    with run_lock(cfg.trainer.out_dir):  # one writer per run folder, released however the run ends
        return recipe(cfg.method.recipe).train(cfg)
