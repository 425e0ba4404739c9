"""GRPO (TRL) on a scalarised reward, one policy per preference from a common start: the routine MORLHF and
Rewarded Soups share (MORLHF at the preferences of a grid, Rewarded Soups at the K one-hot ones).

    0  the common start's trainable weights kept (``policies/start.safetensors``)
    for each preference w:
    1  the policy restarts from the common start, conditioned on w (prompt and, with preference-aware
       LoRA, the adapters' mix)
    2  GRPO: ``trainer.iterations`` steps of ``trainer.batch_size`` prompts x ``trainer.n_samples``
       completions; the objectives are its reward functions (normalised rewards), ``reward_weights`` = w;
       with ``trainer.seeding=row`` each completion is drawn by meal's sampler with its own seed
       (``SeededCompletions``), so that the run does not depend on the number of processes
    3  the policy's trainable weights saved (``policies/<i>.safetensors``), the run checkpointed
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from meal.config import ConfigError, need
from meal.harness.budget import Budget
from meal.harness.run import Run
from meal.policy.preference_lora import preference_weights
from meal.policy.rollout import OnlineSampling, Scoring
from meal.policy.sampling import GenerationSettings, generate

log = logging.getLogger(__name__)


def check_grpo(method, cfg) -> None:
    """What GRPO asks of any method that trains with it."""
    need(method.beta >= 0, "method.beta", f"must be >= 0, got {method.beta}")
    need(cfg.trainer.replay == 0, "trainer.replay", f"{method.name} trains with GRPO on its own samples only")
    need(cfg.trainer.n_samples >= 2, "trainer.n_samples", "GRPO compares the completions of a prompt: needs >= 2")


class ScoreCache:
    """The reward set on normalised units, scored once per batch of completions for all K reward functions;
    counts what it scored (responses, tokens, reward calls, the completions' tokens by ``tokenizer``) into
    ``budget``."""

    def __init__(self, scoring: Scoring, tokenizer, budget: Budget):
        self.reward_set, self.normalizer = scoring.reward_set, scoring.normalizer
        self.tokenizer, self.budget = tokenizer, budget
        self._key: tuple | None = None
        self._value: torch.Tensor | None = None

    def __call__(self, texts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        key = (tuple(texts), tuple(completions))
        if key != self._key:
            raw = self.reward_set.score(list(texts), list(completions))  # (B, K)
            tokens = sum(len(self.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions)
            self.budget.add_sampling(len(completions), tokens, raw.shape[1])
            self._key, self._value = key, self.normalizer(raw)
        return self._value

    def reward_function(self, k: int, name: str):
        """TRL's reward function for objective k: the normalised reward of each completion."""
        def fn(prompts, completions, text, **_) -> list[float]:
            return self(text, completions)[:, k].tolist()

        fn.__name__ = name
        return fn


class SeededCompletions:
    """TRL's ``rollout_func`` under ``trainer.seeding=row``: the completions of GRPO's step drawn by meal's
    sampler, each with its own generator seeded by (``seed``, the step, the prompt, its repeat), as the online
    loop of static, Meal and RiC draws its responses. A process therefore draws for its share of a step what
    one process draws for those prompts, and two processes train the single process's policy. (TRL's own
    generation, ``trainer.seeding=rank``, draws from each process's random stream.) ``w`` (1, K): the policy's
    preference, read by preference-aware LoRA while it samples."""

    def __init__(self, model, tokenizer, settings: GenerationSettings, seed: int, w: torch.Tensor):
        self.model, self.tokenizer, self.w = model, tokenizer, w
        self.online = OnlineSampling.build(settings, "row", seed)

    def __call__(self, prompts: list[str], trainer) -> dict:
        settings = self.online.settings
        q = self.online.queries(prompts, self.w.expand(len(prompts), -1), 1, trainer.state.global_step)
        gen = generate(self.model, self.tokenizer, prompts, settings, q.seed, q.prefs)
        prompt_ids = [self.tokenizer(p, add_special_tokens=False, truncation=True,
                                     max_length=settings.max_prompt_tokens)["input_ids"] for p in prompts]
        return {"prompt_ids": prompt_ids, "completion_ids": gen.ids, "logprobs": None}


def policy_file(folder: str, i: int) -> str:
    return os.path.join(folder, "policies", f"{i:02d}.safetensors")


def load_into(params: dict[str, torch.Tensor], path: str, saved: dict[str, torch.Tensor] | None = None) -> None:
    """Copy the weights saved at ``path`` (or ``saved``, already read) into ``params``."""
    saved = saved if saved is not None else load_file(path)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n].to(p.dtype))


def train_policies(cfg, run: Run, prefs: list[list[float]]) -> None:
    """Steps 0-3 for each preference of ``prefs``: GRPO on w . R from the common start, one saved policy
    each (``policies/<i>.safetensors``), with the trainer, method and task settings of ``cfg``; policies
    already saved (a resumed run) are kept. Shared with Rewarded Soups, whose policies are the ones at the K
    one-hot preferences."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    t, m, dist = cfg.trainer, cfg.method, run.dist
    if (t.batch_size * t.n_samples) % dist.world:
        raise ConfigError(f"trainer.batch_size: {t.batch_size} prompts x {t.n_samples} completions a step do not "
                          f"split over {dist.world} processes")
    if t.seeding == "row" and t.batch_size % dist.world:  # a prompt's repeats are counted within one process
        raise ConfigError(f"trainer.batch_size: with trainer.seeding=row each process samples whole groups of "
                          f"completions; {t.batch_size} prompts do not split over {dist.world} processes")
    start_file = os.path.join(run.run_dir, "policies", "start.safetensors")
    if dist.main and not os.path.exists(start_file):  # 0. the common start, kept for every policy (and a resume)
        os.makedirs(os.path.dirname(start_file), exist_ok=True)
        save_file({n: p.detach().contiguous().cpu() for n, p in run.policy.params.items()}, start_file)
    dist.barrier()  # every process, whether or not the file was there when it looked
    start = load_file(start_file)
    scored = Budget()  # what this process scored; the run's budget counts every process's
    scores = ScoreCache(run.scoring, run.policy.tokenizer, scored)
    texts = run.train_texts
    for i, w in enumerate(prefs):
        if os.path.exists(policy_file(run.run_dir, i)):
            log.info("policy %d (w = %s) already trained (resume)", i, w)
            continue
        tic = time.perf_counter()
        # 1. from the common start, conditioned on w
        load_into(run.policy.params, start_file, start)
        data = Dataset.from_dict({"prompt": run.policy.condition(texts, torch.tensor([w] * len(texts))), "text": texts})
        # 2. GRPO on w . R
        args = GRPOConfig(
            output_dir=os.path.join(run.run_dir, "grpo", f"{i:02d}"), max_steps=t.iterations,
            per_device_train_batch_size=t.batch_size * t.n_samples // dist.world, num_generations=t.n_samples,
            max_completion_length=cfg.task.max_new_tokens, learning_rate=t.lr, weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm, temperature=t.temperature, top_p=t.top_p, top_k=t.top_k,
            beta=m.beta, reward_weights=list(w), seed=t.seed + i, data_seed=t.seed, logging_steps=1,
            save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
            disable_tqdm=not dist.main)
        seeded = None
        if t.seeding == "row":
            seeded = SeededCompletions(run.policy.model, run.policy.tokenizer, run.policy.settings, t.seed + i,
                                       torch.tensor([w], dtype=torch.float32))
        with warnings.catch_warnings():  # rollout_func is "experimental" in TRL: a warning for TRL's users, not meal's
            warnings.filterwarnings("ignore", message="You are using 'rollout_func'")
            trainer = GRPOTrainer(model=run.policy.model, args=args, train_dataset=data,
                                  processing_class=run.policy.tokenizer, rollout_func=seeded,
                                  reward_funcs=[scores.reward_function(k, name)
                                                for k, name in enumerate(run.objectives)])
        with preference_weights(run.policy.model, torch.tensor([w])):
            trainer.train()
        plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
        zero_stage = int(plugin.zero_stage) if trainer.is_deepspeed_enabled and plugin is not None else 0
        budget = run.progress.budget
        budget.add_sampling(round(dist.mean(scored.responses) * dist.world),
                            round(dist.mean(scored.tokens) * dist.world), len(run.objectives))
        scored.responses = scored.tokens = scored.reward_calls = 0
        budget.steps += trainer.state.global_step
        budget.seconds += time.perf_counter() - tic
        # 3. keep the policy, record its training, checkpoint (the processes' policies are one: DDP's)
        if dist.main:
            save_file({n: p.detach().contiguous().cpu() for n, p in run.policy.params.items()},
                      policy_file(run.run_dir, i))
            for entry in trainer.state.log_history:
                if "loss" in entry or "reward" in entry:
                    metrics = {f"grpo/{k}": v for k, v in entry.items() if isinstance(v, (int, float))}
                    metrics["grpo/policy"] = i
                    metrics["grpo/processes"] = dist.world
                    metrics["grpo/zero_stage"] = zero_stage  # 0: plain DDP; 1 or 2: TRL's trainer ran DeepSpeed ZeRO
                    run.report.record(run.logger, metrics, i * t.iterations + int(entry.get("step", 0)))
        run.save(i + 1, trainer.optimizer, policies_done=i + 1)
