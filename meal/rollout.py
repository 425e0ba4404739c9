"""One rollout: prompts with preferences -> N sampled responses -> normalised reward tensor (step 4).

Also the reward-normalisation scoring pass that fixes the statistics before training, and the
seeded prompt order (an epoch-wise permutation whose position is saved in checkpoints).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from meal.config import TemplateConfig
from meal.profiling import NoMeter
from meal.rewards import RewardNormalizer, RewardSet
from meal.sampling import GenerationSettings, generate
from meal.templates import build_prompt

log = logging.getLogger(__name__)


@dataclass
class Conditioner:
    """Writes preferences into prompts for one task and tokenizer (the single template function)."""

    template: TemplateConfig
    objectives: list[str]
    tokenizer: object

    def __call__(self, texts: Sequence[str], prefs: torch.Tensor) -> list[str]:
        """Prompt strings for texts (B,) under preferences (B, K)."""
        return [build_prompt(self.template, t, p.tolist(), self.objectives, self.tokenizer)
                for t, p in zip(texts, prefs)]


@dataclass
class Rollout:
    """N responses per prompt and their rewards: texts[b][n]; raw and normalised rewards (B, N, K)."""

    texts: list[list[str]]
    finished: list[list[bool]]
    raw: torch.Tensor
    rewards: torch.Tensor
    num_tokens: int
    gen_seconds: float


def rollout(model, condition: Conditioner, texts: Sequence[str], prefs: torch.Tensor, n: int,
            settings: GenerationSettings, reward_set: RewardSet, normalizer: RewardNormalizer | None,
            seed: int | None = None, meter=NoMeter()) -> Rollout:
    """Sample ``n`` responses for each text under its preference (B, K) and score them."""
    b = len(texts)
    prompts = condition(texts, prefs)
    t0 = time.perf_counter()
    with meter.phase("generate"):
        gen = generate(model, condition.tokenizer, [p for p in prompts for _ in range(n)], settings, seed)  # (B*N)
    gen_seconds = time.perf_counter() - t0
    with meter.phase("score"):
        raw = reward_set.score([t for t in texts for _ in range(n)], gen.texts).view(b, n, -1)  # (B, N, K)
    normed = normalizer(raw) if normalizer is not None else raw
    grid = [gen.texts[i * n:(i + 1) * n] for i in range(b)]
    done = [gen.finished[i * n:(i + 1) * n] for i in range(b)]
    return Rollout(grid, done, raw, normed, gen.num_tokens, gen_seconds)


def draw_preferences(b: int, k: int, alpha: float, rng: np.random.Generator,
                     fixed: Sequence[float] | None = None) -> torch.Tensor:
    """Target preferences w* (B, K) from Dirichlet(alpha), or the fixed preference repeated (step 1)."""
    if fixed is not None:
        return torch.tensor([list(fixed)] * b, dtype=torch.float32)
    return torch.as_tensor(rng.dirichlet([alpha] * k, size=b), dtype=torch.float32)


def fit_normalizer(model, condition: Conditioner, texts: Sequence[str], n: int, settings: GenerationSettings,
                   reward_set: RewardSet, alpha: float, seed: int) -> tuple[RewardNormalizer, Rollout]:
    """The scoring pass over training prompts that fixes the z-normalisation (method.md)."""
    rng = np.random.default_rng(seed + 7919)
    prefs = draw_preferences(len(texts), len(condition.objectives), alpha, rng)
    ro = rollout(model, condition, texts, prefs, n, settings, reward_set, None)
    norm = RewardNormalizer.fit(ro.raw.reshape(-1, ro.raw.shape[-1]), condition.objectives)
    log.info("reward statistics from %d responses: mean %s std %s", ro.raw.shape[0] * ro.raw.shape[1],
             [round(m, 4) for m in norm.mean], [round(s, 4) for s in norm.std])
    return norm, ro


class PromptOrder:
    """Batches of prompt indices from seeded per-epoch permutations; ``state`` resumes exactly."""

    def __init__(self, n: int, seed: int, epoch: int = 0, pos: int = 0):
        self.n, self.seed, self.epoch, self.pos = n, seed, epoch, pos

    def _perm(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next(self, b: int) -> list[int]:
        out = []
        while len(out) < b:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
            take = min(b - len(out), self.n - self.pos)
            out.extend(self._perm()[self.pos:self.pos + take].tolist())
            self.pos += take
        return out

    @property
    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}
