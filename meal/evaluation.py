"""Evaluation protocol of method.md: preference grid -> front -> Pareto set, hypervolume, alignment.

For each preference w of the grid the policy is conditioned on w, generates one response for
every test prompt (top_p 0.9, top_k 0, temperature 1, a fixed seed), the responses are scored by
the run's reward set and normalisation, and the mean normalised reward per objective is one point.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from meal.rewards import RewardNormalizer, RewardSet
from meal.rollout import Conditioner, rollout
from meal.sampling import GenerationSettings

log = logging.getLogger(__name__)

GRID_3 = [(0, 0, 1), (0, 1, 0), (.1, .1, .8), (.1, .8, .1), (.2, .2, .6), (.2, .4, .4), (.2, .6, .2),
          (1 / 3, 1 / 3, 1 / 3), (.4, .4, .2), (.4, .2, .4), (.6, .2, .2), (.8, .1, .1), (1, 0, 0)]


def preference_grid(k: int, points: int | None = None) -> list[list[float]]:
    """The evaluation grid: K = 2: w1 = 0.0, 0.1, ..., 1.0 (11 points, or ``points`` evenly spaced);
    K = 3: the 13 points of method.md."""
    if k == 2:
        n = points or 11
        return [[round(i / (n - 1), 4), round(1 - i / (n - 1), 4)] for i in range(n)]
    if k == 3:
        return [list(map(float, p)) for p in GRID_3]
    raise ValueError(f"no evaluation grid is defined for K = {k} objectives (K = 2 or 3)")


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-dominated rows of (P, K) points under maximisation (duplicates kept)."""
    import moocore

    return np.asarray(moocore.is_nondominated(np.asarray(points, dtype=float), maximise=True, keep_weakly=True))


def hypervolume(points: np.ndarray, ref: Sequence[float]) -> float:
    """Hypervolume dominated by (P, K) points above the reference point, maximising every objective.

    Points that do not strictly dominate ``ref`` contribute nothing.
    """
    import moocore

    pts = np.asarray(points, dtype=float).reshape(-1, len(ref))
    pts = pts[(pts > np.asarray(ref, dtype=float)).all(axis=1)]
    if len(pts) == 0:
        return 0.0
    return float(moocore.hypervolume(pts, ref=np.asarray(ref, dtype=float), maximise=True))


@dataclass
class Front:
    """An evaluated front: points (P, K) of mean normalised rewards, one per grid preference."""

    objectives: list[str]
    preferences: list[list[float]]
    points: list[list[float]]
    raw_points: list[list[float]]
    pareto: list[bool]
    hypervolume: float
    hv_ref: list[float]
    alignment: float
    num_prompts: int
    seed: int
    label: str = ""
    extra: dict = field(default_factory=dict)

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=2)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Front":
        try:
            with open(path) as f:
                return cls(**json.load(f))
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"{path} is not a front written by meal-eval: {e}") from e


def evaluate_front(model, condition: Conditioner, texts: Sequence[str], reward_set: RewardSet,
                   normalizer: RewardNormalizer, grid: Sequence[Sequence[float]], settings: GenerationSettings,
                   hv_ref: Sequence[float], seed: int = 0, label: str = "") -> Front:
    """Condition on every grid preference, generate for every text, score, average: the front."""
    points, raw_points, alignment = [], [], []
    for w in grid:
        prefs = torch.tensor([list(w)] * len(texts), dtype=torch.float32)
        ro = rollout(model, condition, texts, prefs, 1, settings, reward_set, normalizer, seed=seed)
        r = ro.rewards[:, 0]  # (P, K) normalised
        points.append(r.mean(0).tolist())
        raw_points.append(ro.raw[:, 0].mean(0).tolist())
        alignment.append((r * prefs).sum(-1).mean().item())
    pts = np.array(points)
    hv = hypervolume(pts, hv_ref)
    front = Front(list(condition.objectives), [list(map(float, w)) for w in grid], points, raw_points,
                  pareto_mask(pts).tolist(), hv, list(map(float, hv_ref)), float(np.mean(alignment)), len(texts),
                  seed, label)
    log.info("front %s: hypervolume %.4f (reference point %s), alignment %.4f", label, hv, list(hv_ref),
             front.alignment)
    return front
