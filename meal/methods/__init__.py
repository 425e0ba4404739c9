"""One module per method, each with ``train(cfg) -> summary`` over the shared harness.

Adding a method: a module here, its schema in :mod:`meal.method_configs` (``method_schemas``), a YAML in
``conf/method/`` and a test.
"""

from __future__ import annotations

import importlib
from types import ModuleType

RECIPES = {"meal": "meal.methods.meal", "ric": "meal.methods.ric", "morlhf": "meal.methods.morlhf",
           "metaaligner": "meal.methods.metaaligner",
           "soups": "meal.methods.soups"}


def recipe(name: str) -> ModuleType:
    """The module of recipe ``name`` (validated by :func:`meal.config.typed_method` before this)."""
    return importlib.import_module(RECIPES[name])
