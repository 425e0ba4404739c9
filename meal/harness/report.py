"""What a run shows from outside: progress bar, namespaced metrics, sample tables, evaluations.

Kept out of the recipes (``meal/methods/``) so that each recipe's loop reads as its algorithm.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from meal.evaluation.front import Front, FrontSpec, evaluate_front, preference_grid
from meal.evaluation.plotting import plot_fronts
from meal.harness.tracking import JsonlWriter
from meal.policy.rollout import Rollout, Scoring
from meal.policy.sampling import GenerationSettings
from meal.policy.templates import format_preference

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def first_prompts(split, count: int) -> list[str]:
    """The texts of the first ``count`` prompts of a split (0: all of them)."""
    return [e.text for e in split[:count or len(split)]]


def front_provenance(run: dict[str, Any], run_dir: str, normalizer, budgets: dict | None = None, **more
                     ) -> dict[str, Any]:
    """What a front's ``extra`` records: the run folder, the run (:func:`meal.harness.settings.run_provenance`),
    the reward normalisation (meal-compare refuses fronts whose normalisations differ) and what training
    cost (``budget``: the online stage; ``conditioning_budget``: the conditioning stage, apart)."""
    out = {"run_dir": os.path.abspath(run_dir), **more, **run, "normalizer": normalizer.__dict__}
    for name, b in (budgets or {}).items():
        out["budget" if name == "online" else f"{name}_budget"] = None if b is None else b.as_dict()
    return out


def _entropy(w: torch.Tensor) -> torch.Tensor:
    return -(w * w.clamp_min(1e-12).log()).sum(-1)


@dataclass
class ReportSettings:
    """What a run's report needs of its config, read once at the edge
    (:func:`meal.harness.settings.read_run_spec`): the run's ``name`` (progress bar, logger), the front's
    ``label``, the hypervolume's reference point, how many prompts the periodic and the final evaluation
    take, the evaluation protocol's sampling, and what every front records of the run
    (:func:`meal.harness.settings.run_provenance`)."""

    name: str
    label: str
    hv_ref: list[float]
    eval_prompts: int
    final_eval_prompts: int
    eval_settings: GenerationSettings
    provenance: dict[str, Any]


class Report:
    """Metrics, tables and evaluations of one run; ``last`` holds the latest logged metrics."""

    def __init__(self, run_dir: str, settings: ReportSettings, objectives: Sequence[str]):
        self.run_dir, self.settings, self.objectives = run_dir, settings, list(objectives)
        self.jsonl = JsonlWriter(os.path.join(run_dir, "metrics.jsonl"))
        self.last: dict[str, float] = {}
        self.bar = None
        self.budgets: dict = {}  # name -> Budget (online, conditioning), recorded with every front
        self.diagnostics: dict | None = None  # the meta-learner's last diagnostics (Meal), recorded with the front

    def progress(self, start: int, stop: int, show: bool = True):
        self.bar = tqdm(range(start, stop), initial=start, total=stop, desc=self.settings.name, unit="it",
                        dynamic_ncols=True, disable=not show)
        return self.bar

    def iteration_metrics(self, ro: Rollout, r_kept, w_star, w_phi, loss, grad_norm, c) -> dict[str, float]:
        """train/*, reward/<name> (raw mean over all samples), reward_kept/<name>, weights/*."""
        out = {"train/loss": loss, "train/grad_norm": grad_norm, "train/sample_weight_std": c.std().item()
               if len(c) > 1 else 0.0, "train/response_tokens": ro.num_tokens / max(1, ro.raw.shape[0] *
                                                                                    ro.raw.shape[1]),
               "train/scalarised": (w_star.unsqueeze(1) * ro.rewards).sum(-1).mean().item(),
               "train/tokens_per_s": ro.num_tokens / max(ro.gen_seconds, 1e-9)}
        for k, name in enumerate(self.objectives):
            out[f"reward/{name}"] = ro.raw[..., k].mean().item()
            out[f"reward_norm/{name}"] = ro.rewards[..., k].mean().item()
            out[f"reward_kept/{name}"] = r_kept[:, k].mean().item()
        if w_phi is not None:
            for k, name in enumerate(self.objectives):
                out[f"weights/{name}"] = w_phi[:, k].mean().item()
                out[f"weights/{name}_std"] = w_phi[:, k].std().item() if len(w_phi) > 1 else 0.0
            out["weights/entropy"] = _entropy(w_phi).mean().item()
            out["weights/dist_to_target"] = (w_phi - w_star).abs().sum(-1).mean().item()
        return out

    def record(self, logger, metrics: dict[str, float], step: int, every: int = 1) -> None:
        self.last = dict(metrics)
        self.jsonl.write({"step": step, **metrics})
        if step % every == 0:
            logger.log(metrics, step)
        if self.bar is not None:
            post = {"loss": f"{metrics.get('train/loss', float('nan')):.3f}"}
            post.update({n: f"{metrics[f'reward/{n}']:.3f}" for n in self.objectives if f"reward/{n}" in metrics})
            self.bar.set_postfix(post, refresh=False)

    def sample_table(self, logger, step: int, texts: Sequence[str], prefs: torch.Tensor, ro: Rollout,
                     rows: int = 4) -> None:
        columns = ["step", "preference", "prompt", "response"] + list(self.objectives)
        data = [[step, format_preference(prefs[i].tolist(), self.objectives), texts[i][:300], ro.texts[i][0]]
                + [round(v, 4) for v in ro.raw[i, 0].tolist()] for i in range(min(rows, len(texts)))]
        logger.log_table("samples", columns, data, step)

    def _evaluate(self, responder, texts, reward_set, normalizer, grid, csv_dir: str | None = None) -> Front:
        s = self.settings
        spec = FrontSpec(grid, list(s.hv_ref), seed=0, label=s.label, csv_dir=csv_dir)
        front = evaluate_front(responder, texts, s.eval_settings, Scoring(reward_set, normalizer), spec)
        front.extra.update(front_provenance(s.provenance, self.run_dir, normalizer, self.budgets))
        return front

    def periodic_eval(self, logger, responder, prompts, reward_set, normalizer, step: int) -> None:
        """A small grid (3 points for K = 2) on the first ``trainer.eval_prompts`` of ``prompts`` (the
        validation split): ``val/hypervolume``, ``val/spearman/<objective>`` ..., one learning-curve point."""
        k = len(self.objectives)
        grid = preference_grid(2, points=3) if k == 2 else preference_grid(k)
        texts = [e.text for e in prompts[:self.settings.eval_prompts]]
        front = self._evaluate(responder, texts, reward_set, normalizer, grid)
        metrics = {"eval/hypervolume": front.hypervolume, "eval/alignment": front.alignment,
                   **following_metrics(front)}
        metrics = {f"val/{key.split('/', 1)[1]}": v for key, v in metrics.items()}
        self.jsonl.write({"step": step, **metrics})
        logger.log(metrics, step)

    def final_eval(self, logger, responder, prompts, reward_set, normalizer, step: int, split: str = "test"
                   ) -> dict[str, Any]:
        """The full grid (or the responder's own ``grid``: MORLHF) on ``prompts`` (the ``split``, recorded
        in the front); writes front.json, front.png and each preference's responses and scores
        (``responses/``, RiC's CSV layout) into the run folder."""
        texts = first_prompts(prompts, self.settings.final_eval_prompts)
        grid = responder.grid or preference_grid(len(self.objectives))
        front = self._evaluate(responder, texts, reward_set, normalizer, grid,
                               csv_dir=os.path.join(self.run_dir, "responses"))
        front.extra["split"] = split
        if self.diagnostics is not None:  # what the meta-learner did (Meal), beside the front
            front.extra["meta_learner"] = self.diagnostics
        return publish_front(front, self.run_dir, logger, step, self.jsonl)


def publish_front(front: Front, out_dir: str, logger, step: int, jsonl: JsonlWriter | None = None
                  ) -> dict[str, Any]:
    """Write front.json and front.png, log them (image and table); return the summary numbers."""
    json_path, png_path = os.path.join(out_dir, "front.json"), os.path.join(out_dir, "front.png")
    front.save(json_path)
    plot_fronts([front], png_path)
    metrics = {"eval/hypervolume": front.hypervolume, "eval/alignment": front.alignment, **following_metrics(front)}
    if jsonl is not None:
        jsonl.write({"step": step, **metrics})
    logger.log(metrics, step)
    logger.log_image("eval/front", png_path, step)
    logger.log_table("eval/front_points", [f"w{i + 1}" for i in range(len(front.objectives))] + front.objectives
                     + ["pareto"],
                     [list(w) + list(p) + [par] for w, p, par in zip(front.preferences, front.points, front.pareto)],
                     step)
    log.info("hypervolume %.4f (reference point %s); front: %s", front.hypervolume, front.hv_ref, png_path)
    return {"hypervolume": front.hypervolume, "hv_ref": front.hv_ref, "alignment": front.alignment,
            "following": front.following_summary(), "budget": front.extra.get("budget"),
            "conditioning_budget": front.extra.get("conditioning_budget"), "front_png": png_path,
            "front_json": json_path}


def following_metrics(front: Front) -> dict[str, float]:
    """eval/spearman/<objective>, eval/range/<objective>, eval/nondominated, eval/degenerate."""
    out = {"eval/nondominated": front.nondominated, "eval/degenerate": front.degenerate}
    for name, rho, rng in zip(front.objectives, front.spearman, front.ranges):
        out[f"eval/range/{name}"] = rng
        if rho is not None:
            out[f"eval/spearman/{name}"] = rho
    return out
