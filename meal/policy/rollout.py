"""One rollout: prompts with preferences -> N sampled responses -> normalised reward tensor (step 4).

Also the reward-normalisation scoring pass that fixes the statistics before training, and the
seeded prompt order (an epoch-wise permutation whose position is saved in checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Protocol, Sequence

import numpy as np
import torch

from meal.config import TemplateConfig
from meal.harness.profiling import NoMeter
from meal.policy.sampling import Generation, GenerationSettings, generate, iteration_seed
from meal.policy.templates import build_prompt, format_preference, format_scores, render_prompt
from meal.rewards import RewardNormalizer, RewardSet

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

    def preference_text(self, pref: Sequence[float]) -> str:
        """What goes at the template's ``{preference}`` for ``pref`` (meal-export's prompt template)."""
        return format_preference(list(pref), self.objectives)


@dataclass
class ScoreConditioner(Conditioner):
    """Writes desired normalised scores (B, K) into prompts instead of weights: RiC's rewards in context,
    in the task's template at ``{preference}``."""

    decimals: int = 1

    def __call__(self, texts: Sequence[str], scores: torch.Tensor) -> list[str]:
        return [render_prompt(self.template, t, format_scores(s.tolist(), self.objectives, self.decimals),
                              self.tokenizer) for t, s in zip(texts, scores)]

    def preference_text(self, scores: Sequence[float]) -> str:
        return format_scores(list(scores), self.objectives, self.decimals)


class Responder(Protocol):
    """What training rollouts, the evaluation and meal-export ask of a method's answering policy (the
    method's ``responder``). Its capabilities, which shared code reads instead of asking which method it is:
    ``grid``, the only preferences it answers (MORLHF's policies; None: any); ``desired_scores(w)``, the
    desired normalised scores it writes into its prompt at ``w`` (RiC; None: a preference); ``cost()``,
    what answering cost per response (MetaAligner's policy + corrector; None: only the policy's sampling)."""

    grid: list[list[float]] | None

    @property
    def objectives(self) -> list[str]: ...

    def respond(self, texts: Sequence[str], prefs: torch.Tensor, settings: GenerationSettings,
                seed: int | None = None, n: int = 1) -> Generation: ...

    def preference_text(self, w: Sequence[float]) -> str: ...

    def load_weights(self, w: Sequence[float]) -> None: ...

    def desired_scores(self, w: Sequence[float]) -> list[float] | None: ...

    def cost(self) -> dict[str, float] | None: ...


class ResponderBase:
    """The capabilities of :class:`Responder` a responder does not have: any preference, no desired scores,
    no cost beyond sampling, one set of weights for every preference."""

    grid: list[list[float]] | None = None

    def load_weights(self, w: Sequence[float]) -> None:
        """Put the weights this responder answers with at ``w`` into its model (meal-export): one set of
        weights answers every preference here."""

    def desired_scores(self, w: Sequence[float]) -> list[float] | None:
        return None

    def cost(self) -> dict[str, float] | None:
        return None


@dataclass
class ConditionedPolicy(ResponderBase):
    """The default responder: a policy that reads its preference from its prompt (and, with
    preference-aware LoRA, from its weights). A responder is what training rollouts and evaluation ask
    for responses: ``respond(texts, prefs, settings, seed, n) -> Generation``. Other methods bring
    their own (RiC writes desired scores, a soup interpolates weights per preference)."""

    model: object
    condition: Conditioner

    @property
    def objectives(self) -> list[str]:
        return list(self.condition.objectives)

    def preference_text(self, w: Sequence[float]) -> str:
        """The words written into the prompt at ``w`` (meal-export writes them into meal_prompt.json)."""
        return self.condition.preference_text(w)

    def respond(self, texts: Sequence[str], prefs: torch.Tensor, settings: GenerationSettings,
                seed: int | None = None, n: int = 1) -> Generation:
        """``n`` responses per text (B*N, text-major) under its preference (B, K)."""
        prompts = self.condition(texts, prefs)
        sample = settings.sampler or generate  # the Hugging Face path unless a backend was configured
        return sample(self.model, self.condition.tokenizer, [p for p in prompts for _ in range(n)], settings, seed,
                      prefs=prefs.repeat_interleave(n, 0), row_keys=[t for t in texts for _ in range(n)])


@dataclass
class Rollout:
    """N responses per prompt and their rewards: texts[b][n]; raw and normalised rewards (B, N, K)."""

    texts: list[list[str]]
    finished: list[list[bool]]
    raw: torch.Tensor
    rewards: torch.Tensor
    num_tokens: int
    gen_seconds: float


@dataclass
class Queries:
    """What a rollout asks: ``n`` responses to each of ``texts`` under its preference (``prefs``, (B, K));
    ``seed``: the call's own seed (None: the caller's random stream); ``reward_texts``: what the rewards see
    as each prompt, when it differs from the text the policy is conditioned on (the conditioning stage's
    pool appends an instruction to the latter)."""

    texts: Sequence[str]
    prefs: torch.Tensor
    n: int = 1
    seed: int | None = None
    reward_texts: Sequence[str] | None = None


@dataclass(frozen=True)
class OnlineSampling:
    """How an online loop samples (``trainer.seeding``): with ``seed``, each iteration's responses are drawn
    per row from :func:`~meal.policy.sampling.iteration_seed` hashed with the prompt and the repeat, so every
    process draws what one process would draw for the same prompt (a run does not depend on the launcher);
    ``seed`` None: each process's own random stream."""

    settings: GenerationSettings
    seed: int | None = None

    @classmethod
    def build(cls, settings: GenerationSettings, seeding: str, seed: int) -> "OnlineSampling":
        if seeding == "row":
            return cls(replace(settings, seeding="row"), seed)
        return cls(settings, None)

    def queries(self, texts: Sequence[str], prefs: torch.Tensor, n: int, iteration: int) -> Queries:
        return Queries(texts, prefs, n, None if self.seed is None else iteration_seed(self.seed, iteration))


@dataclass
class Scoring:
    """What responses are scored by: the reward set, and the normalisation (None: raw rewards)."""

    reward_set: RewardSet
    normalizer: RewardNormalizer | None = None


def rollout(responder: Responder, queries: Queries, settings: GenerationSettings, scoring: Scoring,
            meter=NoMeter()) -> Rollout:
    """Ask ``responder`` (e.g. a :class:`ConditionedPolicy`) for ``queries.n`` responses to each text under
    its preference, and score them."""
    q, n = queries, queries.n
    b = len(q.texts)
    t0 = time.perf_counter()
    with meter.phase("generate"):
        gen = responder.respond(q.texts, q.prefs, settings, q.seed, n)  # (B*N)
    gen_seconds = time.perf_counter() - t0
    with meter.phase("score"):
        scored_texts = [t for t in (q.reward_texts or q.texts) for _ in range(n)]
        raw = scoring.reward_set.score(scored_texts, gen.texts).view(b, n, -1)  # (B, N, K)
    normed = scoring.normalizer(raw) if scoring.normalizer is not None else raw
    grid = [gen.texts[i * n:(i + 1) * n] for i in range(b)]
    done = [gen.finished[i * n:(i + 1) * n] for i in range(b)]
    return Rollout(grid, done, raw, normed, gen.num_tokens, gen_seconds)


def draw_preferences(b: int, k: int, alpha: float, rng: np.random.Generator,
                     fixed: Sequence[float] | None = None) -> torch.Tensor:
    """Target preferences w* (B, K) from Dirichlet(alpha), or the fixed preference repeated (step 1)."""
    if fixed is not None:
        return torch.tensor([list(fixed)] * b, dtype=torch.float32)
    return torch.as_tensor(rng.dirichlet([alpha] * k, size=b), dtype=torch.float32)


@dataclass
class Draws:
    """How a seeded scoring pass samples: ``samples`` responses per prompt, each under its own
    Dirichlet(``alpha``) preference, all from ``seed`` (the normalisation pass, the conditioning stage's pool)."""

    samples: int
    alpha: float
    seed: int


def fit_normalizer(policy: ConditionedPolicy, texts: Sequence[str], settings: GenerationSettings,
                   reward_set: RewardSet, draws: Draws) -> RewardNormalizer:
    """The scoring pass over training prompts that fixes the z-normalisation (method.md).

    Runs under its own seed inside ``fork_rng``: the training RNG stream is the same whether the
    statistics are computed or read from the cache.
    """
    objectives = policy.objectives
    with torch.random.fork_rng(devices=[]):
        prefs = draw_preferences(len(texts), len(objectives), draws.alpha, np.random.default_rng(draws.seed))
        ro = rollout(policy, Queries(texts, prefs, draws.samples, draws.seed), settings, Scoring(reward_set))
    norm = RewardNormalizer.fit(ro.raw.reshape(-1, ro.raw.shape[-1]), objectives)
    log.info("reward statistics from %d responses: mean %s std %s", ro.raw.shape[0] * ro.raw.shape[1],
             [round(m, 4) for m in norm.mean], [round(s, 4) for s in norm.std])
    return norm


def statistics_key(c: dict) -> dict:
    """What the reward statistics depend on: policy, data, template, rewards, sampling and the pass
    (``c``: the run's resolved config)."""
    t = c["trainer"]
    return {"policy": [c["policy"]["name_or_path"], c["policy"]["gguf_file"]], "data": c["task"]["data"],
            "template": c["task"]["template"], "max_new_tokens": c["task"]["max_new_tokens"],
            "rewards": {o: c["rewards"][o] for o in c["task"]["objectives"]},
            "sampling": [t["top_p"], t["top_k"], t["temperature"], t["dirichlet_alpha"]],
            "pass": [t["norm_prompts"], t["norm_samples"], t["norm_seed"]]}


@dataclass(frozen=True)
class NormalisationPass:
    """The scoring pass that fits a run's reward statistics when it has no conditioning stage:
    ``prompts`` training prompts (chosen by ``draws.seed``) with ``draws``; ``cache`` (``trainer.stats_cache``,
    None: no cache) holds its result under a hash of ``key`` (:func:`statistics_key`)."""

    prompts: int
    draws: Draws
    cache: str | None
    key: dict


def reward_statistics(norm_pass: NormalisationPass, policy: ConditionedPolicy, train_texts: Sequence[str],
                      settings: GenerationSettings, reward_set: RewardSet) -> RewardNormalizer:
    """Statistics of the scoring pass, read from ``trainer.stats_cache`` when the same key was seen.

    The pass uses ``trainer.norm_seed`` (not the training seed), so that every run of a task,
    whatever its method or seed, shares one normalisation and fronts compare in the same units.
    """
    key, cache = norm_pass.key, norm_pass.cache
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = os.path.join(os.path.expanduser(cache), f"{digest}.json") if cache else None
    if path and os.path.exists(path):
        log.info("reward statistics from the cache %s", path)
        return RewardNormalizer.load(path, policy.objectives)
    order = np.random.default_rng(norm_pass.draws.seed).permutation(len(train_texts))[:norm_pass.prompts]
    norm = fit_normalizer(policy, [train_texts[i] for i in order], settings, reward_set, norm_pass.draws)
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        norm.save(path, {"key": key})
    return norm


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
