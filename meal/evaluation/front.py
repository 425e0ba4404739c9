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

from meal.policy.rollout import Queries, Responder, Scoring, rollout
from meal.policy.sampling import GenerationSettings, degenerate_mask

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


def preference_following(prefs: Sequence[Sequence[float]], points: Sequence[Sequence[float]]) -> dict:
    """How well a front follows its preferences (method.md, evaluation protocol).

    For each objective k: ``spearman[k]``, the Spearman rank correlation between w_k and the
    points' k-th coordinate over the grid (None where either is constant: a front that does not
    move cannot be ranked); ``ranges[k]``, the mean k-th coordinate at the grid points with the
    largest w_k minus that at the points with the smallest. ``nondominated``: the number of distinct
    non-dominated points.
    """
    from scipy.stats import spearmanr

    w, pts = np.asarray(prefs, dtype=float), np.asarray(points, dtype=float)
    spearman, ranges = [], []
    for k in range(w.shape[1]):
        const = np.ptp(w[:, k]) == 0 or np.ptp(pts[:, k]) == 0
        spearman.append(None if const else float(spearmanr(w[:, k], pts[:, k]).statistic))
        hi, lo = w[:, k] == w[:, k].max(), w[:, k] == w[:, k].min()
        ranges.append(float(pts[hi, k].mean() - pts[lo, k].mean()))
    front = pts[pareto_mask(pts)]
    distinct = len(np.unique(np.round(front, 9), axis=0))
    return {"spearman": spearman, "ranges": ranges, "nondominated": int(distinct)}


@dataclass
class Front:
    """An evaluated front: points (P, K) of mean normalised rewards, one per grid preference, with
    how well it follows them (:func:`preference_following`) and the share of degenerate responses."""

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
    spearman: list = field(default_factory=list)
    ranges: list = field(default_factory=list)
    nondominated: int = 0
    degenerate: float = 0.0

    def following_summary(self) -> str:
        """One line: rank correlation and range per objective, distinct non-dominated points, degenerate share."""
        rho = ", ".join(f"{o} {'n/a' if r is None else f'{r:+.2f}'}" for o, r in zip(self.objectives, self.spearman))
        rng = ", ".join(f"{o} {r:+.2f}" for o, r in zip(self.objectives, self.ranges))
        return (f"Spearman(w_k, reward_k): {rho}; range: {rng}; non-dominated: {self.nondominated} of "
                f"{len(self.points)}; degenerate responses: {100 * self.degenerate:.1f}%")

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


@dataclass
class FrontSpec:
    """Where a front is taken and how it is written: the ``grid`` of preferences, the hypervolume's reference
    point ``hv_ref``, the evaluation ``seed``, the front's ``label``, and ``csv_dir`` (None: no CSVs) where each
    preference's responses and scores go in RiC's layout (:func:`write_ric_csv`)."""

    grid: Sequence[Sequence[float]]
    hv_ref: Sequence[float]
    seed: int = 0
    label: str = ""
    csv_dir: str | None = None


def evaluate_front(responder: Responder, texts: Sequence[str], settings: GenerationSettings, scoring: Scoring,
                   spec: FrontSpec) -> Front:
    """Ask ``responder`` (:class:`~meal.policy.rollout.ConditionedPolicy` or a method's own) for a response to
    every text under every preference of ``spec.grid``, score, average: the front. With ``spec.csv_dir``
    each preference's responses and scores are written there too (with the responder's desired scores
    where it writes them). A responder that reports its cost (``cost()``: MetaAligner's corrector) has it
    in ``front.extra["inference"]``."""
    grid, hv_ref, seed, label, csv_dir = spec.grid, spec.hv_ref, spec.seed, spec.label, spec.csv_dir
    points, raw_points, alignment, degenerate = [], [], [], []
    for w in grid:
        prefs = torch.tensor([list(w)] * len(texts), dtype=torch.float32)
        ro = rollout(responder, Queries(texts, prefs, 1, seed), settings, scoring)
        if csv_dir is not None:
            write_ric_csv(csv_dir, list(w), texts, [t[0] for t in ro.texts], ro.raw[:, 0],
                          responder.desired_scores(w))
        r = ro.rewards[:, 0]  # (P, K) normalised
        points.append(r.mean(0).tolist())
        raw_points.append(ro.raw[:, 0].mean(0).tolist())
        alignment.append((r * prefs).sum(-1).mean().item())
        degenerate.append(degenerate_mask(ro.texts, ro.finished).float().mean().item())
    pts = np.array(points)
    hv = hypervolume(pts, hv_ref)
    grid = [list(map(float, w)) for w in grid]
    front = Front(list(responder.objectives), grid, points, raw_points, pareto_mask(pts).tolist(), hv,
                  list(map(float, hv_ref)), float(np.mean(alignment)), len(texts), seed, label,
                  degenerate=float(np.mean(degenerate)), **preference_following(grid, points))
    front.extra["generation"] = settings.record()  # meal-compare compares only fronts sampled alike
    cost = responder.cost()  # what answering cost per response (MetaAligner: policy + corrector), if more
    if cost is not None:
        front.extra["inference"] = cost
    log.info("front %s: hypervolume %.4f (reference point %s), alignment %.4f; %s", label, hv, list(hv_ref),
             front.alignment, front.following_summary())
    return front


def write_ric_csv(folder: str, w: Sequence[float], texts: Sequence[str], responses: Sequence[str], raw: torch.Tensor,
                  desired: Sequence[float] | None = None) -> str:
    """One preference's responses in RiC's evaluation layout (its ``ric/evaluation.py``):
    ``eval_data_pref<w1>_<w2>[_<w3>].csv`` with an index column, ``prompt``, ``response`` and per
    objective i ``obtained_score<i>`` (raw, not normalised, as RiC's) and ``desired_score<i>`` (the
    desired scores of a rewards-in-context method; empty for the others), so RiC's plotting scripts
    read meal's fronts."""
    import csv

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "eval_data_pref" + "_".join(str(round(float(x), 2)) for x in w) + ".csv")
    k = raw.shape[1]
    header = ["", "prompt", "response"] + [c for i in range(k) for c in (f"obtained_score{i + 1}",
                                                                            f"desired_score{i + 1}")]
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(header)
        for j, (text, resp) in enumerate(zip(texts, responses)):
            row = [j, text, resp]
            for i in range(k):
                row += [float(raw[j, i]), "" if desired is None else round(float(desired[i]), 4)]
            out.writerow(row)
    return path
