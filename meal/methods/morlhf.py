"""MORLHF: linear scalarisation w . R with TRL's GRPO trainer, one policy per preference, read top to bottom.

    0  the common start (the conditioning stage, in start_run); its weights are kept
    for each preference w of the grid (``method.grid_points``):
    1  the policy restarts from the common start, conditioned on w (prompt and, with preference-aware
       LoRA, the adapters' mix)
    2  GRPO (TRL): ``trainer.iterations`` steps of ``trainer.batch_size`` prompts x ``trainer.n_samples``
       completions; the objectives are its reward functions (normalised rewards), ``reward_weights`` = w
    3  the policy's trainable weights are saved (``policies/<i>.safetensors``) and checkpointed
    front: each policy evaluated at its own preference (MorlhfPolicies)
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from meal.config import ConfigError
from meal.evaluation import preference_grid
from meal.harness import Run, start_run
from meal.preference_lora import preference_weights
from meal.rewards import RewardNormalizer, RewardSet
from meal.rollout import ConditionedPolicy, Conditioner
from meal.sampling import Generation, GenerationSettings

log = logging.getLogger(__name__)


class ScoreCache:
    """The reward set on normalised units, scored once per batch of completions for all K reward functions;
    counts what it scored (responses, tokens, reward calls) into the run's budget."""

    def __init__(self, reward_set: RewardSet, normalizer: RewardNormalizer, run: Run):
        self.reward_set, self.normalizer, self.run = reward_set, normalizer, run
        self._key: tuple | None = None
        self._value: torch.Tensor | None = None

    def __call__(self, texts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        key = (tuple(texts), tuple(completions))
        if key != self._key:
            raw = self.reward_set.score(list(texts), list(completions))  # (B, K)
            tokens = sum(len(self.run.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions)
            self.run.budget.add_sampling(len(completions), tokens, raw.shape[1])
            self._key, self._value = key, self.normalizer(raw)
        return self._value

    def reward_function(self, k: int, name: str):
        """TRL's reward function for objective k: the normalised reward of each completion."""
        def fn(prompts, completions, text, **_) -> list[float]:
            return self(text, completions)[:, k].tolist()

        fn.__name__ = name
        return fn


@dataclass
class MorlhfPolicies:
    """MORLHF's responder: the policy trained at preference w answers under w (a grid point it was not
    trained at is refused: its front is each policy at its own preference)."""

    policy: ConditionedPolicy
    params: dict[str, torch.Tensor]
    grid: list[list[float]]
    folder: str

    @property
    def objectives(self) -> list[str]:
        return self.policy.objectives

    def preference_text(self, w: Sequence[float]) -> str:
        return self.policy.preference_text(w)

    def load_weights(self, w: Sequence[float]) -> None:
        """The policy trained at ``w`` (one of the grid) into the model's trainable tensors."""
        w = torch.tensor(list(w))
        match = [i for i, g in enumerate(self.grid) if torch.allclose(torch.tensor(g), w, atol=1e-4)]
        if not match:
            raise ValueError(f"MORLHF trained no policy at {w.tolist()}; its preferences are {self.grid}")
        load_into(self.params, policy_file(self.folder, match[0]))

    def respond(self, texts, prefs: torch.Tensor, settings: GenerationSettings, seed: int | None = None,
                n: int = 1) -> Generation:
        if not all(torch.allclose(p, prefs[0]) for p in prefs):
            raise ValueError("MORLHF answers one preference per call (one policy per preference)")
        self.load_weights(prefs[0].tolist())
        return self.policy.respond(texts, prefs, settings, seed, n)


def policy_file(folder: str, i: int) -> str:
    return os.path.join(folder, "policies", f"{i:02d}.safetensors")


def load_into(params: dict[str, torch.Tensor], path: str, saved: dict[str, torch.Tensor] | None = None) -> None:
    """Copy the weights saved at ``path`` (or ``saved``, already read) into ``params``."""
    saved = saved if saved is not None else load_file(path)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n].to(p.dtype))


def responder(cfg, model, tokenizer, run_dir: str | None = None) -> MorlhfPolicies:
    """What evaluates a MORLHF run (``run_dir``: the run folder holding ``policies/``)."""
    from meal.policy import trainable_parameters

    k = len(cfg.task.objectives)
    policy = ConditionedPolicy(model, Conditioner(cfg.task.template, list(cfg.task.objectives), tokenizer))
    return MorlhfPolicies(policy, trainable_parameters(model), preference_grid(k, cfg.method.grid_points),
                          run_dir or cfg.trainer.out_dir)


def train(cfg) -> dict[str, Any]:
    """One GRPO policy per grid preference from the common start; the front of each at its own preference."""
    t = cfg.trainer
    with start_run(cfg) as run:
        grid = preference_grid(len(run.objectives), cfg.method.grid_points)
        train_policies(run, grid)  # 1-3 for each preference of the grid
        summary = {"run_dir": run.run_dir, "iterations": t.iterations, "policies": len(grid)}
        if t.final_eval:
            summary.update(run.evaluate(responder(cfg, run.model, run.tokenizer, run.run_dir)))  # at its own grid
        return summary


def train_policies(run: Run, prefs: list[list[float]]) -> None:
    """Steps 0-3 for each preference of ``prefs``: GRPO on w . R from the common start, one saved policy
    each (``policies/<i>.safetensors``); policies already saved (a resumed run) are kept. Shared with
    Rewarded Soups, whose policies are the ones at the K one-hot preferences."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    cfg = run.cfg
    t, m = cfg.trainer, cfg.method
    if run.dist.world > 1:
        raise ConfigError(f"method={m.recipe}: one process only (launch without accelerate's data parallelism); "
                          f"TRL's trainer would bring its own, which meal does not wire in")
    start_file = os.path.join(run.run_dir, "policies", "start.safetensors")
    if not os.path.exists(start_file):  # 0. the common start, kept for every policy (and a resume)
        os.makedirs(os.path.dirname(start_file), exist_ok=True)
        save_file({n: p.detach().contiguous().cpu() for n, p in run.params.items()}, start_file)
    start = load_file(start_file)
    scores = ScoreCache(run.reward_set, run.normalizer, run)
    texts = run.train_texts
    for i, w in enumerate(prefs):
        if os.path.exists(policy_file(run.run_dir, i)):
            log.info("policy %d (w = %s) already trained (resume)", i, w)
            continue
        tic = time.perf_counter()
        # 1. from the common start, conditioned on w
        load_into(run.params, start_file, start)
        data = Dataset.from_dict({"prompt": run.condition(texts, torch.tensor([w] * len(texts))), "text": texts})
        # 2. GRPO on w . R
        args = GRPOConfig(
            output_dir=os.path.join(run.run_dir, "grpo", f"{i:02d}"), max_steps=t.iterations,
            per_device_train_batch_size=t.batch_size * t.n_samples, num_generations=t.n_samples,
            max_completion_length=cfg.task.max_new_tokens, learning_rate=t.lr, weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm, temperature=t.temperature, top_p=t.top_p, top_k=t.top_k,
            beta=m.beta, reward_weights=list(w), seed=t.seed + i, data_seed=t.seed, logging_steps=1,
            save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
            disable_tqdm=not run.dist.main)
        trainer = GRPOTrainer(model=run.model, args=args, train_dataset=data, processing_class=run.tokenizer,
                              reward_funcs=[scores.reward_function(k, name) for k, name in enumerate(run.objectives)])
        with preference_weights(run.model, torch.tensor([w])):
            trainer.train()
        run.budget.steps += trainer.state.global_step
        run.budget.seconds += time.perf_counter() - tic
        # 3. keep the policy, record its training, checkpoint
        save_file({n: p.detach().contiguous().cpu() for n, p in run.params.items()}, policy_file(run.run_dir, i))
        for entry in trainer.state.log_history:
            if "loss" in entry or "reward" in entry:
                metrics = {f"grpo/{k}": v for k, v in entry.items() if isinstance(v, (int, float))}
                metrics["grpo/policy"] = i
                run.ctx.record(run.logger, metrics, i * t.iterations + int(entry.get("step", 0)))
        run.save(i + 1, trainer.optimizer, policies_done=i + 1)
