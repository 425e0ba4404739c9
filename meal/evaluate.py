"""``meal-eval``: evaluate the Pareto front of a trained run with its own rewards and normalisation.

For each preference of the grid (K = 2: 11 points, K = 3: 13) the policy generates for every test
prompt with a fixed seed (top_p 0.9, top_k 0, temperature 1); see :mod:`meal.evaluation`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from meal.config import ConfigError, register_configs, to_container
from meal.run_folder import read_run
from meal.train import CONF_DIR, print_front, refuse_file_folder, user_errors

log = logging.getLogger("meal")


def evaluate_run(run_dir: str, checkpoint: str = "latest", untrained: bool = False, prompts: int = 0,
                 seed: int = 0, batch_size: int = 32, label: str | None = None, out_dir: str | None = None,
                 logger_cfg: Any = None, stack_on: str | None = None, split: str = "test", trust: bool = False
                 ) -> dict[str, Any]:
    """Evaluate ``run_dir`` (its config.yaml, reward_stats.json and a checkpoint); write the front.
    ``stack_on`` (a MetaAligner run only): what its corrector rewrites, base | conditioned | a run folder.
    ``split``: test (reported fronts) | validation (the prompts the task holds out of training).
    ``trust``: open a run folder whose config or state.pt names code outside meal's own (:func:`read_run`).
    Everything that can be checked is checked before the policy loads (config, data, rewards); writing into
    the run folder takes its lock (:func:`meal.harness.run_lock`): a run still training is refused."""
    from hydra.utils import instantiate

    from meal.checkpoint import load_policy_weights
    from meal.evaluation import evaluate_front, preference_grid
    from meal.harness import build_rewards, load_task_data
    from meal.run_folder import run_lock
    from meal.policy import load_policy, trainable_parameters
    from meal.rewards import RewardNormalizer
    from meal.methods import recipe, start_responder
    from meal.run import eval_texts, front_provenance, generation_settings, publish_front

    if split not in ("test", "validation"):  # before any model loads
        raise ConfigError(f"split: test | validation, got {split!r}")
    cfg, folder = read_run(run_dir, checkpoint, untrained, trust)
    objectives = list(cfg.task.objectives)
    normalizer = RewardNormalizer.load(os.path.join(run_dir, "reward_stats.json"), objectives)
    data = load_task_data(cfg)
    reward_set = build_rewards(cfg)  # a reward module that cannot be imported is named here, before the policy
    if not data.split(split):
        raise ConfigError(f"split: {run_dir}'s task holds no {split} prompts (task.validation_prompts = "
                          f"{cfg.task.validation_prompts})")
    texts = eval_texts(cfg, data.split(split), prompts)
    if stack_on is not None:
        if "stack_on" not in cfg.method:
            raise ConfigError(f"stack_on: {run_dir} is a {cfg.method.recipe} run; only a MetaAligner run's corrector "
                              f"is stacked on another policy")
        if untrained or checkpoint == "conditioned":
            raise ConfigError("stack_on: evaluates the trained corrector (leave checkpoint and untrained alone)")
        out_dir = out_dir or os.path.join(run_dir, f"eval-on-{os.path.basename(os.path.normpath(stack_on))}")
    name = label or (f"{cfg.method.name} (base)" if untrained else "conditioned" if checkpoint == "conditioned"
                     else cfg.method.name if stack_on is None
                     else f"{cfg.method.name} on {os.path.basename(os.path.normpath(stack_on))}")
    out_dir = out_dir_for(run_dir, out_dir, untrained, checkpoint)
    inside = os.path.commonpath([os.path.abspath(out_dir), os.path.abspath(run_dir)]) == os.path.abspath(run_dir)
    budgets = run_budgets(run_dir, folder, untrained, checkpoint == "conditioned", trust)  # reads state.pt (as data)
    net = None if untrained or checkpoint == "conditioned" else net_diagnostics(run_dir, folder, trust)
    settings = dataclasses.replace(generation_settings(cfg, eval_protocol=True), batch_size=batch_size)
    with run_lock(run_dir, "run_dir") if inside else contextlib.nullcontext():  # a run still training: refused
        model, tok = load_policy(cfg.policy, len(objectives))
        if folder is not None:
            load_policy_weights(folder, trainable_parameters(model))
        if untrained or checkpoint == "conditioned":  # the start alone, without what the method trained beside it
            responder = start_responder(cfg.method.recipe, cfg, model, tok)
        elif stack_on is not None:
            responder = recipe(cfg.method.recipe).responder(cfg, model, tok, run_dir, stack_on=stack_on)
        else:
            responder = recipe(cfg.method.recipe).responder(cfg, model, tok, run_dir)  # how the method answers under w
        grid = getattr(responder, "grid", None) or preference_grid(len(objectives))  # MORLHF: its own preferences
        front = evaluate_front(responder, texts, reward_set, normalizer, grid, settings, list(cfg.task.hv_ref),
                               seed=seed, label=name, csv_dir=os.path.join(out_dir, "responses"))
        front.extra.update(front_provenance(cfg, run_dir, normalizer, budgets, checkpoint=folder, split=split))
        if net:  # what the meta-learner had done by these weights (Meal), as meal-train records it with its front
            front.extra["meta_learner"] = net
        if stack_on is not None:
            front.extra["stacked_on"] = stack_on
        os.makedirs(out_dir, exist_ok=True)
        logger = instantiate(logger_cfg if logger_cfg is not None else {"_target_": "meal.tracking.NullLogger"})
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

    from meal.checkpoint import load_state
    from meal.meta_learner import DIAGNOSTIC_KEYS

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
    from meal.budget import Budget
    from meal.checkpoint import load_state
    from meal.conditioning import conditioning_budget, read_conditioning

    if untrained:
        return {"online": Budget(), "conditioning": None}
    stage = conditioning_budget(read_conditioning(run_dir))
    if conditioned:
        return {"online": Budget(), "conditioning": stage}
    state = load_state(os.path.join(folder, "state.pt"), trust)
    return {"online": Budget.from_dict(state.get("budget")), "conditioning": stage}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def _main(cfg: DictConfig) -> None:
    with user_errors():
        out = evaluate_run(cfg.run_dir, cfg.checkpoint, cfg.untrained, cfg.prompts, cfg.seed, cfg.batch_size,
                           cfg.label, cfg.out_dir, cfg.logger, cfg.stack_on, cfg.split, cfg.trust_run)
    print_front(out)


def main() -> None:
    register_configs()
    refuse_file_folder(sys.argv[1:], "run_dir")
    _main()


if __name__ == "__main__":
    main()
