"""The methods: one registry, each method registered once, and :func:`train`, which runs the one a config names.

A method is one module of this package that ends with ``METHOD = Method(...)``: its name (the ``method.recipe``
value), the dataclass its ``method`` config node follows, its own validation, ``train(cfg) -> summary`` (a
recipe over the shared harness, :mod:`meal.harness.run`) and ``responder(cfg, model, tokenizer, run_dir)``: how
a trained run answers under a preference (what ``meal-eval`` and the final evaluation ask, a
:class:`~meal.policy.rollout.Responder`). The modules of :data:`BUILTIN` are found by name; any other method
(a user's, or a test's toy) is :func:`register`-ed from where it is defined.

Adding a method: one module (its ``METHOD``), one YAML in ``conf/method/`` (``recipe: <name>``), one test.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from meal.config import ConfigError, TrainConfig, check_known_keys, need, validate

BUILTIN = {"meal": "meal.methods.meal", "ric": "meal.methods.ric", "morlhf": "meal.methods.morlhf",
           "soups": "meal.methods.soups", "metaaligner": "meal.methods.metaaligner"}


def no_checks(method: Any, cfg: DictConfig) -> None:
    """A method with nothing to check beyond its schema's types."""


@dataclass(frozen=True)
class Method:
    """Everything the shared code asks of a method (it never asks for a method by name).

    ``start_responder(cfg, model, tokenizer)``: how its starting weights answer (the base or the conditioned
    policy, without what it trained beside its checkpoint), where that is not a plain conditioned policy
    (RiC: desired scores). ``desired_scores``: its prompts hold desired normalised scores, not a preference
    (RiC; the conditioning stage labels with ``conditioning.label=scores`` for it and only for it).
    ``not_exportable``: why ``meal-export`` refuses its runs (None: exportable). ``stacks``: its responder
    takes ``stack_on`` (another run to rewrite: MetaAligner)."""

    name: str
    config: type
    train: Callable[[DictConfig], dict]
    responder: Callable[..., Any]
    validate: Callable[[Any, DictConfig], None] = no_checks
    start_responder: Callable[..., Any] | None = None
    desired_scores: bool = False
    not_exportable: str | None = None
    stacks: bool = False


_REGISTERED: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` known by its name (a method defined outside this package; a test's toy)."""
    if method.name in BUILTIN:
        raise ValueError(f"method {method.name!r} is one of meal's own; register it under another name")
    _REGISTERED[method.name] = method
    return method


def unregister(name: str) -> None:
    """Forget a method :func:`register` made known (a test's toy)."""
    _REGISTERED.pop(name, None)


def names() -> list[str]:
    return sorted(set(BUILTIN) | set(_REGISTERED))


def get(name: str) -> Method:
    """The method registered as ``name``; ConfigError naming the known ones."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    need(name in BUILTIN, "method.recipe", f"unknown recipe {name!r}; known: {names()}")
    return importlib.import_module(BUILTIN[name]).METHOD


def typed_method(node: Any) -> DictConfig:
    """The ``method`` node merged onto its method's schema; ConfigError naming an unknown recipe or key."""
    node = OmegaConf.create(node if node is not None else {})
    method = get(node.get("recipe", "meal"))
    check_known_keys(node, method.config, "method.")
    try:
        return OmegaConf.merge(OmegaConf.structured(method.config), node)
    except Exception as e:  # noqa: BLE001 - a value of the wrong type: name the field
        raise ConfigError(f"method: {e}") from e


def typed_config(cfg: Any) -> DictConfig:
    """A new config: ``cfg`` (a DictConfig, a plain dict, a partial one in tests) merged onto the schema,
    interpolations resolved once (a timestamped out_dir), its ``method`` node typed by its method's schema,
    and every value checked (:func:`meal.config.validate`, then the method's own checks); ConfigError
    naming the field otherwise. Loads no model."""
    if not isinstance(cfg, DictConfig) or OmegaConf.get_type(cfg) is dict:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
    else:
        cfg = copy.deepcopy(cfg)  # the caller's config is never written into
    OmegaConf.resolve(cfg)  # freeze interpolations (e.g. a timestamped out_dir) once
    check_known_keys(cfg)
    cfg.method = typed_method(cfg.method)  # the new config's method node, typed: unknown keys and types fail here
    m = get(cfg.method.recipe)
    validate(cfg, desired_scores=m.desired_scores)
    m.validate(cfg.method, cfg)
    return cfg


def train(cfg: Any) -> dict[str, Any]:
    """Train as configured (``method.recipe`` names the method); returns a summary of the run."""
    from meal.harness.run_folder import run_lock

    cfg = typed_config(cfg)
    with run_lock(cfg.trainer.out_dir):  # one writer per run folder, released however the run ends
        return get(cfg.method.recipe).train(cfg)


def start_responder(cfg, model, tokenizer):
    """How the run's starting weights answer (before anything its method trained beside its checkpoint:
    experts, per-preference policies, a corrector): the method's ``start_responder`` where it has one, else
    w written into the prompt as the conditioning stage taught."""
    method = get(cfg.method.recipe)
    if method.start_responder is not None:
        return method.start_responder(cfg, model, tokenizer)
    from meal.policy.rollout import ConditionedPolicy, Conditioner

    return ConditionedPolicy(model, Conditioner(cfg.task.template, list(cfg.task.objectives), tokenizer))
