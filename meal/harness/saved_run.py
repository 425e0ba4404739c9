"""A finished run, read back from its folder by every command that opens one (meal-eval, meal-generate,
meal-export) and by MetaAligner's stacking: :func:`read_run` (its config and checkpoint folder, as data,
refusing code it would import), :func:`load_run` (its policy with a checkpoint's weights),
:func:`load_run_responder` (how it answers under a preference) and :func:`evaluate_run` (its front)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from meal.config import DTYPES, ConfigError, TrainConfig, to_container
from meal.harness.run_folder import foreign_targets, run_lock
from meal.methods import get, start_responder, typed_method

log = logging.getLogger(__name__)


def read_run(run_dir: str, checkpoint: str = "latest", untrained: bool = False, trust: bool = False):
    """(cfg, weights folder) of a run written by meal-train, before any model loads: its config.yaml with
    the method typed, and the folder of ``checkpoint`` (latest | conditioned | a checkpoint name; None
    when ``untrained``). A run folder is data: a config that names a ``_target_`` outside meal's own (a
    callable that opening the run would import and call) is refused, naming it, unless ``trust``."""
    from meal.harness.checkpoint import latest_checkpoint

    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(cfg_path):
        raise ConfigError(f"run_dir: {run_dir} has no config.yaml (not a folder written by meal-train)")
    raw = OmegaConf.load(cfg_path)
    foreign = foreign_targets(OmegaConf.to_container(raw, resolve=False))
    if foreign and not trust:
        field, target = foreign[0]
        raise ConfigError(f"run_dir: {cfg_path} names _target_ {target!r} at {field}, outside meal's own: opening "
                          f"the run would import and call it. If you trust the folder (your own reward module), "
                          f"pass trust_run=true")
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), raw)
    cfg.method = typed_method(cfg.method)  # the config just read: its method node typed by its method's schema
    folder = None
    if not untrained:
        if checkpoint == "conditioned":  # the run's starting point: the conditioning stage's policy
            folder = os.path.join(run_dir, "conditioning")
            if not os.path.exists(os.path.join(folder, "policy.safetensors")):
                raise ConfigError(f"checkpoint: {run_dir} ran no conditioning stage (no conditioning/)")
        elif checkpoint == "latest":
            folder = latest_checkpoint(run_dir)
        else:
            folder = os.path.join(run_dir, "checkpoints", checkpoint)
        if folder is None or not os.path.isdir(folder):
            raise ConfigError(f"checkpoint: {run_dir} has no checkpoint {checkpoint!r}")
    return cfg, folder


def load_run(run_dir: str, checkpoint: str = "latest", untrained: bool = False, trust: bool = False,
             dtype: str | None = None):
    """(cfg, model, tokenizer, weights folder) of a run written by meal-train (:func:`read_run`), the policy
    with the weights of ``checkpoint`` loaded, or none (``untrained``); ``dtype`` (float32, bfloat16, ...)
    replaces the run's ``policy.dtype`` (None: the run's own)."""
    from meal.harness.checkpoint import load_policy_weights
    from meal.policy.model import load_policy, trainable_parameters

    cfg, folder = read_run(run_dir, checkpoint, untrained, trust)
    policy = cfg.policy
    if dtype is not None:
        check_dtype(dtype)
        policy = OmegaConf.merge(cfg.policy, {"dtype": dtype})  # the run's config itself stays as it was saved
    model, tok = load_policy(policy, len(cfg.task.objectives))
    if folder is not None:
        load_policy_weights(folder, trainable_parameters(model))
    return cfg, model, tok, folder


def check_dtype(dtype: str) -> None:
    """A ``dtype=`` option of meal-generate / meal-export: one of policy.dtype's values, else ConfigError."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: {' | '.join(DTYPES)}, got {dtype!r}")


def load_run_responder(run_dir: str, checkpoint: str = "latest"):
    """How a trained run answers under a preference (its method's responder, its latest weights): what
    another method (MetaAligner's corrector) can be stacked on."""
    cfg, model, tok, _ = load_run(run_dir, checkpoint)
    responder = get(cfg.method.recipe).responder(cfg, model, tok, run_dir)
    if responder.grid is not None:
        raise ConfigError(f"stack_on: {run_dir} is a {cfg.method.recipe} run, whose policies answer only their own "
                          f"grid preferences; stack on a run that answers any preference")
    return responder


@dataclass
class EvalOptions:
    """What meal-eval evaluates and how: which weights (``checkpoint``: latest | conditioned | a checkpoint
    name; ``untrained``: the base policy), on which prompts (``split``: test, for reported fronts, or
    validation, the prompts the task holds out of training; ``prompts``: how many, 0 = the run's own final
    evaluation's count), with which seed and generation batch, under which ``label``, into which ``out_dir``
    (default eval/, eval-base/ or eval-conditioned/ inside the run), logged by ``logger_cfg`` (a ``_target_``
    spec; None: no logger); ``stack_on`` (a MetaAligner run only): what its corrector rewrites, base |
    conditioned | a run folder; ``trust``: open a run folder whose config or state.pt names code outside
    meal's own (:func:`read_run`)."""

    checkpoint: str = "latest"
    untrained: bool = False
    prompts: int = 0
    seed: int = 0
    batch_size: int = 32
    label: str | None = None
    out_dir: str | None = None
    logger_cfg: Any = None
    stack_on: str | None = None
    split: str = "test"
    trust: bool = False


def evaluate_run(run_dir: str, options: EvalOptions | None = None) -> dict[str, Any]:
    """Evaluate ``run_dir`` (its config.yaml, reward_stats.json and a checkpoint) as ``options`` say; write
    the front. Everything that can be checked is checked before the policy loads (config, data, rewards);
    writing into the run folder takes its lock (:func:`meal.harness.run_folder.run_lock`): a run still training is
    refused."""
    from hydra.utils import instantiate

    from meal.evaluation.front import FrontSpec, evaluate_front, preference_grid
    from meal.harness.checkpoint import load_policy_weights
    from meal.harness.preflight import build_rewards, load_task_data
    from meal.harness.report import front_provenance, publish_front
    from meal.harness.settings import eval_texts, generation_settings, run_provenance
    from meal.policy.model import load_policy, trainable_parameters
    from meal.policy.rollout import Scoring
    from meal.rewards import RewardNormalizer

    o = options or EvalOptions()
    checkpoint, untrained, stack_on, split, trust = o.checkpoint, o.untrained, o.stack_on, o.split, o.trust
    if split not in ("test", "validation"):  # before any model loads
        raise ConfigError(f"split: test | validation, got {split!r}")
    cfg, folder = read_run(run_dir, checkpoint, untrained, trust)
    objectives = list(cfg.task.objectives)
    normalizer = RewardNormalizer.load(os.path.join(run_dir, "reward_stats.json"), objectives)
    data = load_task_data(cfg.task)
    # a reward module that cannot be imported is named here, before the policy
    reward_set = build_rewards(to_container(cfg.rewards), objectives)
    if not data.split(split):
        raise ConfigError(f"split: {run_dir}'s task holds no {split} prompts (task.validation_prompts = "
                          f"{cfg.task.validation_prompts})")
    texts = eval_texts(cfg, data.split(split), o.prompts)
    out_dir = o.out_dir
    if stack_on is not None:
        if not get(cfg.method.recipe).stacks:
            raise ConfigError(f"stack_on: {run_dir} is a {cfg.method.recipe} run; only a MetaAligner run's corrector "
                              f"is stacked on another policy")
        if untrained or checkpoint == "conditioned":
            raise ConfigError("stack_on: evaluates the trained corrector (leave checkpoint and untrained alone)")
        out_dir = out_dir or os.path.join(run_dir, f"eval-on-{os.path.basename(os.path.normpath(stack_on))}")
    name = o.label or (f"{cfg.method.name} (base)" if untrained else "conditioned" if checkpoint == "conditioned"
                       else cfg.method.name if stack_on is None
                       else f"{cfg.method.name} on {os.path.basename(os.path.normpath(stack_on))}")
    out_dir = out_dir_for(run_dir, out_dir, untrained, checkpoint)
    inside = os.path.commonpath([os.path.abspath(out_dir), os.path.abspath(run_dir)]) == os.path.abspath(run_dir)
    budgets = run_budgets(run_dir, folder, untrained, checkpoint == "conditioned", trust)  # reads state.pt (as data)
    net = None if untrained or checkpoint == "conditioned" else net_diagnostics(run_dir, folder, trust)
    settings = dataclasses.replace(generation_settings(cfg, eval_protocol=True), batch_size=o.batch_size)
    with run_lock(run_dir, "run_dir") if inside else contextlib.nullcontext():  # a run still training: refused
        model, tok = load_policy(cfg.policy, len(objectives))
        if folder is not None:
            load_policy_weights(folder, trainable_parameters(model))
        if untrained or checkpoint == "conditioned":  # the start alone, without what the method trained beside it
            responder = start_responder(cfg, model, tok)
        elif stack_on is not None:
            responder = get(cfg.method.recipe).responder(cfg, model, tok, run_dir, stack_on=stack_on)
        else:
            responder = get(cfg.method.recipe).responder(cfg, model, tok, run_dir)  # how the method answers under w
        grid = responder.grid or preference_grid(len(objectives))  # MORLHF: its own preferences
        spec = FrontSpec(grid, list(cfg.task.hv_ref), o.seed, name, os.path.join(out_dir, "responses"))
        front = evaluate_front(responder, texts, settings, Scoring(reward_set, normalizer), spec)
        front.extra.update(front_provenance(run_provenance(cfg), run_dir, normalizer, budgets, checkpoint=folder,
                                            split=split))
        if net:  # what the meta-learner had done by these weights (Meal), as meal-train records it with its front
            front.extra["meta_learner"] = net
        if stack_on is not None:
            front.extra["stacked_on"] = stack_on
        os.makedirs(out_dir, exist_ok=True)
        null = {"_target_": "meal.harness.tracking.NullLogger"}
        logger = instantiate(o.logger_cfg if o.logger_cfg is not None else null)
        logger.start(out_dir, {"run_dir": run_dir, "train_config": to_container(cfg)}, f"eval-{name}", False)
        try:
            return publish_front(front, out_dir, logger, step=0)
        finally:
            logger.finish()


def out_dir_for(run_dir: str, out_dir: str | None, untrained: bool, checkpoint: str) -> str:
    """Where meal-eval writes: ``out_dir``, else eval-base / eval-conditioned / eval inside the run."""
    return out_dir or os.path.join(run_dir, "eval-base" if untrained else "eval-conditioned"
                                   if checkpoint == "conditioned" else "eval")


def net_diagnostics(run_dir: str, folder: str, trust: bool = False) -> dict[str, float] | None:
    """The meta-learner's diagnostics (``meta/param_distance``, ``meta/w_phi_spread_*`` ...) that the run
    logged at the step of the checkpoint ``folder``, from its metrics.jsonl; None for a run without a net."""
    import json

    from meal.harness.checkpoint import load_state
    from meal.methods.meta_learner import DIAGNOSTIC_KEYS

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    step = load_state(os.path.join(folder, "state.pt"), trust).get("step")
    found = None
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if row.get("step") == step and "meta/param_distance" in row:
                found = {k: row[k] for k in DIAGNOSTIC_KEYS if k in row}
    return found


def run_budgets(run_dir: str, folder: str | None, untrained: bool, conditioned: bool, trust: bool = False) -> dict:
    """What the evaluated weights cost: nothing for the base policy; the conditioning stage for its
    policy; the online budget saved with a checkpoint, beside the conditioning stage's."""
    from meal.harness.budget import Budget
    from meal.harness.checkpoint import load_state
    from meal.harness.conditioning import conditioning_budget, read_conditioning

    if untrained:
        return {"online": Budget(), "conditioning": None}
    stage = conditioning_budget(read_conditioning(run_dir))
    if conditioned:
        return {"online": Budget(), "conditioning": stage}
    state = load_state(os.path.join(folder, "state.pt"), trust)
    return {"online": Budget.from_dict(state.get("budget")), "conditioning": stage}
