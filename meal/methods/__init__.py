"""One module per method, each with ``train(cfg) -> summary`` over the shared harness and
``responder(cfg, model, tokenizer, run_dir=None)``: how a trained run answers under a preference (what
``meal-eval`` and the final evaluation ask). A responder that answers only some preferences says which in
its ``grid`` (MORLHF); a module whose start (base or conditioned weights, before anything the method
trained) answers differently from a plain conditioned policy defines ``start_responder`` (RiC).

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


def start_responder(name: str, cfg, model, tokenizer):
    """How recipe ``name``'s starting weights answer (the base or the conditioned policy, without what the
    method trained beside its checkpoint: experts, per-preference policies, a corrector): the recipe's
    ``start_responder`` if it has one, else w written into the prompt as the conditioning stage taught."""
    module = recipe(name)
    if hasattr(module, "start_responder"):
        return module.start_responder(cfg, model, tokenizer)
    from meal.rollout import ConditionedPolicy, Conditioner

    return ConditionedPolicy(model, Conditioner(cfg.task.template, list(cfg.task.objectives), tokenizer))
