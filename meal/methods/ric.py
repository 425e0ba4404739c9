"""RiC, rewards in context (Yang et al. 2024), over the shared harness, read top to bottom.

The prompt holds desired normalised scores ("helpful 1.3, concise -0.4") instead of weights::

    0  offline stage: every corpus row written with the normalised rewards it obtained
       (the conditioning stage with ``conditioning.label=scores``), SFT                 (start_run)
    online (MORS), per iteration:
    1  desired scores for B prompts: one objective at a random value in [lo, hi], the others at hi,
       [lo, hi] the min and max of ``method.score_draws`` N(0, 1) draws
    2  N samples each (temperature ``method.sample_temperature``), scored and normalised   (B, N, K)
    3  keep a sample when any objective reaches its ``method.quantile`` over the iteration's samples
    4  relabel the kept samples with the scores they obtained
    5  add as many rows of the offline corpus that pass the same filter (``method.replay_filtered``)
    6  one SFT step (AdamW, ``trainer.lr``) on kept + replayed rows
    inference: a preference w maps to desired scores w / ||w||_2 * (hi - lo) + lo            (RicPolicy)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from meal.config import ConfigError, knob, need
from meal.harness.run import start_run
from meal.methods import Method
from meal.policy.losses import build_batch, policy_step
from meal.policy.rollout import ConditionedPolicy, OnlineSampling, ResponderBase, ScoreConditioner, rollout
from meal.policy.sampling import Generation, GenerationSettings, degenerate_mask

log = logging.getLogger(__name__)


@dataclass
class RicConfig:
    """Rewards-in-context (Yang et al. 2024; the recipe meal/methods/ric.py): the prompt holds desired
    normalised scores instead of weights; online, samples that reach a quantile are relabelled with
    the scores they obtained (MORS)."""

    recipe: str = knob("ric", "The recipe meal/methods/ric.py.")
    name: str = knob("ric", "Label of the method in run names and comparisons.")
    quantile: float = knob(0.7, "Keep an online sample when any objective reaches this quantile of the iteration's "
                           "samples (RiC: 0.7).")
    replay_filtered: bool = knob(True, "Mix into each step as many rows of the conditioning corpus passing the same "
                                 "filter as samples were kept (RiC adds as many original samples).")
    score_draws: int = knob(50000, "N(0, 1) draws whose min and max bound the desired scores (RiC: 50,000).")
    decimals: int = knob(1, "Decimals of the scores written into the prompt (RiC: 0.1).")
    sample_temperature: float = knob(0.7, "Temperature of the online samples (RiC: 0.7; evaluation keeps 1.0).")


def check_config(r, cfg) -> None:
    need(0.0 < r.quantile < 1.0, "method.quantile", f"must be in (0, 1), got {r.quantile}")
    need(r.score_draws >= 2, "method.score_draws", f"must be >= 2, got {r.score_draws}")
    need(0 <= r.decimals <= 3, "method.decimals", f"must be in 0..3, got {r.decimals}")
    need(r.sample_temperature > 0, "method.sample_temperature", f"must be > 0, got {r.sample_temperature}")
    need(not cfg.policy.lora.preference_aware, "policy.lora.preference_aware",
         "RiC writes desired scores, not a preference on the simplex, into the prompt: its adapters cannot mix by "
         "preference (policy.lora.preference_aware=false)")
    need(cfg.conditioning.enabled, "conditioning.enabled", "RiC starts from its offline stage (the conditioning "
         "stage with conditioning.label=scores)")
    need(cfg.trainer.replay == 0, "trainer.replay", "RiC replays filtered corpus rows itself (method.replay_filtered)")


@dataclass
class ScoreRange:
    """[lo, hi] of desired scores: the min and max of ``draws`` N(0, 1) draws (RiC's map)."""

    lo: float
    hi: float

    @classmethod
    def from_draws(cls, draws: int, seed: int = 0) -> "ScoreRange":
        x = np.random.default_rng(seed).standard_normal(draws)
        return cls(float(x.min()), float(x.max()))

    def from_preference(self, w: torch.Tensor) -> torch.Tensor:
        """RiC's inference map (B, K) -> (B, K): w / ||w||_2 * (hi - lo) + lo."""
        return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12) * (self.hi - self.lo) + self.lo

    def online_targets(self, b: int, k: int, rng: np.random.Generator) -> torch.Tensor:
        """Step 1: per row one objective at a uniform value in [lo, hi], the others at hi (B, K)."""
        out = torch.full((b, k), self.hi)
        which = rng.integers(0, k, size=b)
        out[torch.arange(b), torch.as_tensor(which)] = torch.as_tensor(rng.uniform(self.lo, self.hi, size=b),
                                                                       dtype=torch.float32)
        return out


@dataclass
class RicPolicy(ResponderBase):
    """RiC's responder: a preference becomes desired scores, which the policy reads from its prompt."""

    policy: ConditionedPolicy
    scores: ScoreRange

    @property
    def objectives(self) -> list[str]:
        return self.policy.objectives

    def desired_scores(self, w) -> list[float]:
        """The desired normalised scores RiC writes into the prompt at ``w`` (its map)."""
        return self.scores.from_preference(torch.tensor([list(map(float, w))]))[0].tolist()

    def preference_text(self, w) -> str:
        """The desired scores RiC writes into the prompt at ``w`` (its map), as text."""
        return self.policy.preference_text(self.desired_scores(w))

    def respond(self, texts, prefs: torch.Tensor, settings: GenerationSettings, seed: int | None = None,
                n: int = 1) -> Generation:
        return self.policy.respond(texts, self.scores.from_preference(prefs), settings, seed, n)


def responder(cfg, model, tokenizer, run_dir: str | None = None) -> RicPolicy:
    """What evaluates a RiC policy: w mapped to desired scores, written into the prompt."""
    m = cfg.method
    condition = ScoreConditioner(cfg.task.template, list(cfg.task.objectives), tokenizer, m.decimals)
    return RicPolicy(ConditionedPolicy(model, condition), ScoreRange.from_draws(m.score_draws))


def start_responder(cfg, model, tokenizer) -> RicPolicy:
    """RiC's start (its offline stage, or the base policy) is asked as the trained policy: desired scores."""
    return responder(cfg, model, tokenizer)


def global_quantile(rewards: torch.Tensor, valid: torch.Tensor, q: float, dist) -> torch.Tensor:
    """Each objective's ``q`` quantile over the valid samples of every process (all samples when none is
    valid anywhere): the threshold one process would compute over the whole batch. (K,)"""
    flat = rewards.reshape(-1, rewards.shape[-1])
    shares = dist.all_gather((flat[valid.reshape(-1)], flat))  # rank order; a quantile ignores the order
    pool = torch.cat([v for v, _ in shares])
    if not len(pool):
        pool = torch.cat([f for _, f in shares])
    return torch.quantile(pool, q, dim=0)


def quantile_filter(rewards: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Step 3: True where any objective reaches its threshold. rewards (..., K), thresholds (K,)."""
    return (rewards >= thresholds).any(-1)


def train(cfg) -> dict[str, Any]:
    """Train a rewards-in-context policy: the offline stage (in start_run), then MORS iterations."""
    t, m = cfg.trainer, cfg.method
    with start_run(cfg, functools.partial(ScoreConditioner, decimals=m.decimals)) as run:
        dist, k = run.dist, len(run.objectives)
        # w -> desired scores; what meal-eval rebuilds
        evaluated = responder(cfg, run.policy.model, run.policy.tokenizer)
        policy, scores = evaluated.policy, evaluated.scores  # the policy writes the scores it is given
        optimizer, budget = run.policy.optimizer, run.progress.budget
        if getattr(optimizer, "engine", None) is not None:
            raise ConfigError("method=ric under DeepSpeed: the number of kept samples varies per iteration while "
                              "DeepSpeed fixes the micro-batches of a step; launch with plain data parallelism")
        if run.progress.state is not None:
            optimizer.load_state_dict(run.progress.state["optimizer"])
        corpus = run.conditioning.replay  # the offline rows, labelled with their own normalised rewards
        online = OnlineSampling.build(dataclasses.replace(run.policy.settings, temperature=m.sample_temperature),
                                      t.seeding, t.seed)
        texts_all = run.train_texts
        for it in run.iterations():
            tic = time.perf_counter()
            # 1. desired scores for this rank's share of the batch
            idx = run.progress.order.next(t.batch_size)
            desired = scores.online_targets(len(idx), k, run.progress.draws)
            idx, desired = dist.shard(idx), torch.cat(dist.shard(list(desired.split(1))))
            texts = [texts_all[i] for i in idx]
            # 2. N samples each, scored
            ro = rollout(policy, online.queries(texts, desired, t.n_samples, it), online.settings, run.scoring)
            budget.add_sampling(t.batch_size * t.n_samples, round(dist.mean(ro.num_tokens) * dist.world), k)
            # 3. the quantile filter over the iteration's samples (valid ones only), every process's
            valid = ~degenerate_mask(ro.texts, ro.finished)  # (B, N)
            thresholds = global_quantile(ro.rewards, valid, m.quantile, dist)  # (K,)
            keep = quantile_filter(ro.rewards, thresholds) & valid  # (B, N)
            rows, cols = keep.nonzero(as_tuple=True)
            counts = dist.all_gather(len(rows))  # each process's kept samples, in rank order
            n_kept, first = sum(counts), sum(counts[:dist.rank])  # this process's rows: [first, first + len)
            # 4. relabel with the obtained scores
            labels = ro.rewards[rows, cols]  # (n_kept, K)
            prompts = [texts[i] for i in rows.tolist()]
            responses = [ro.texts[i][j] for i, j in zip(rows.tolist(), cols.tolist())]
            finished = [ro.finished[i][j] for i, j in zip(rows.tolist(), cols.tolist())]
            # 5. as many offline rows passing the same filter: drawn for the whole batch (the same draw on
            #    every process), this process taking the share that matches its kept samples
            n_replay = 0
            if m.replay_filtered and n_kept:
                passing = quantile_filter(corpus.labels, thresholds).nonzero().flatten().numpy()
                if len(passing):
                    pick = run.progress.draws.choice(passing, size=n_kept, replace=len(passing) < n_kept)
                    n_replay = n_kept
                    pick = pick[first:first + len(rows)]
                    prompts += [corpus.texts[i] for i in pick]
                    responses += [corpus.responses[i] for i in pick]
                    finished += [corpus.finished[i] for i in pick]
                    labels = torch.cat([labels, corpus.labels[torch.as_tensor(pick, dtype=torch.long)]])
            # 6. one SFT step on them: the mean over every process's rows (a process may hold none)
            loss, grad_norm = 0.0, 0.0
            if n_kept == 0:
                log.warning("iteration %d: no sample passed the filter; no step taken", it + 1)
            else:
                batch = build_batch(run.policy.tokenizer, run.policy.condition(prompts, labels), responses, finished,
                                    t.max_prompt_tokens, prefs=labels) if responses else None
                loss, grad_norm = policy_step(run.policy.model, optimizer, batch, torch.ones(len(responses)),
                                              t.micro_batch_size, dist, global_rows=n_kept + n_replay)
                budget.steps += 1
            step = it + 1
            metrics = {"train/loss": loss, "train/grad_norm": grad_norm, "train/kept": float(n_kept),
                       "train/replay_rows": float(n_replay), "time/iteration": time.perf_counter() - tic}
            means = {"train/degenerate": (~valid).float().mean().item(),
                     "train/response_tokens": ro.num_tokens / max(1, keep.numel())}
            for j, name in enumerate(run.objectives):
                means[f"reward/{name}"] = ro.raw[..., j].mean().item()
                means[f"reward_norm/{name}"] = ro.rewards[..., j].mean().item()
                metrics[f"ric/threshold/{name}"] = thresholds[j].item()  # over every process's samples
            metrics.update(dist.mean_values(means))  # the global batch's, not this process's share
            run.end_iteration(step, t.iterations, metrics, optimizer, responder=evaluated,
                              table=(texts, desired, ro))
        summary = {"run_dir": run.run_dir, "iterations": t.iterations, **run.report.last}
        if t.final_eval:
            summary.update(run.evaluate(evaluated))
        return summary


METHOD = Method("ric", RicConfig, train, responder, check_config, start_responder=start_responder, desired_scores=True)
