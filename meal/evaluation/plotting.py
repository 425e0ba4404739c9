"""Figures of fronts. One run: its points, every one labelled with its w1, as in the paper. Several runs or
methods: each method's front as the mean point per preference over its seeds (seed points faint), w1 labels
at the ends only, in one overlay panel and in small multiples (one panel per method, shared axes) beside
it; K = 3 as pairwise projections (one row of panels per objective pair)."""

from __future__ import annotations

import itertools
import math
import textwrap
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from meal.evaluation.front import Front, pareto_mask


@dataclass
class MethodFront:
    """One method's fronts drawn as one: the mean point per preference over its runs (those on its first
    run's preference grid) and each run's own points."""

    label: str
    preferences: list[list[float]]
    mean: np.ndarray  # (P, K)
    runs: list[np.ndarray]  # each (P, K)
    hypervolumes: list[float]

    @property
    def legend(self) -> str:
        hv = self.hypervolumes
        if len(hv) == 1:
            return f"{self.label} (HV {hv[0]:.3f})"
        return f"{self.label} (HV {np.mean(hv):.3f} ± {np.std(hv, ddof=1):.3f}, {len(hv)} runs)"


def method_fronts(fronts: Sequence[Front]) -> list[MethodFront]:
    """Group ``fronts`` by label (in order of appearance); average each group per preference."""
    out = []
    for label in dict.fromkeys(f.label or "run" for f in fronts):
        members = [f for f in fronts if (f.label or "run") == label]
        grid = [list(p) for p in members[0].preferences]
        same = [f for f in members if [list(p) for p in f.preferences] == grid
                and np.shape(f.points) == np.shape(members[0].points)]
        runs = [np.asarray(f.points, dtype=float) for f in same]
        out.append(MethodFront(label, grid, np.mean(runs, axis=0), runs, [f.hypervolume for f in members]))
    return out


def _draw(ax, mf: MethodFront, a: int, b: int, color: str, every_label: bool) -> None:
    """One method on one panel: faint seed points (several runs), the mean points and their non-dominated
    line; w1 labels on every point (one run) or at the two ends of the grid (several)."""
    if len(mf.runs) > 1:
        for run in mf.runs:
            ax.scatter(run[:, a], run[:, b], color=color, alpha=0.25, s=10, linewidths=0)
    xs, ys = mf.mean[:, a], mf.mean[:, b]
    ax.scatter(xs, ys, color=color, alpha=0.9, s=22, label=mf.legend)
    # the non-dominated points of this projection, joined in order: the front as drawn in the papers
    idx = sorted(pareto_mask(list(zip(xs, ys))).nonzero()[0], key=lambda i: xs[i])
    ax.plot(xs[idx], ys[idx], "-", color=color, alpha=0.9)
    w1 = [p[0] for p in mf.preferences[:len(xs)]]
    ends = range(len(w1)) if every_label else {int(np.argmax(w1)), int(np.argmin(w1))}
    at: dict[tuple[float, float], list[str]] = {}  # coincident points share one label
    for i in ends:
        at.setdefault((round(float(xs[i]), 6), round(float(ys[i]), 6)), []).append(f"{mf.preferences[i][0]:.1f}")
    on_front = {(round(float(xs[i]), 6), round(float(ys[i]), 6)) for i in idx}
    for (x, y), names in at.items():
        # labels of the front above and right of it, of dominated points below and left (inside the front)
        up = (x, y) in on_front
        ax.annotate(",".join(names), (x, y), textcoords="offset points", xytext=(4, 4) if up else (-4, -4),
                    ha="left" if up else "right", va="bottom" if up else "top", fontsize=7, color=color)


def plot_fronts(fronts: Sequence[Front], path: str, title: str | None = None, columns: int = 4) -> str:
    """Draw ``fronts`` (one run, or several runs of one or more methods, told apart by label) and save
    the PNG. Several methods: an overlay panel and one small panel per method, ``columns`` panels a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = fronts[0].objectives
    pairs = list(itertools.combinations(range(len(objectives)), 2))
    methods = method_fronts(fronts)
    every_label = len(fronts) == 1
    panels = 1 + (len(methods) if len(methods) > 1 else 0)  # the overlay, then the small multiples
    cols = min(panels, columns)
    rows_per_pair = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows_per_pair * len(pairs), cols, figsize=(4.6 * cols, 4.0 * rows_per_pair * len(pairs)),
                             squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color_of = {mf.label: cycle[i % len(cycle)] for i, mf in enumerate(methods)}
    for p, (a, b) in enumerate(pairs):
        grid = [axes[p * rows_per_pair + i // cols][i % cols] for i in range(rows_per_pair * cols)]
        everything = np.concatenate([r for mf in methods for r in mf.runs])
        pad_x = 0.05 * (np.ptp(everything[:, a]) or 1.0)
        pad_y = 0.05 * (np.ptp(everything[:, b]) or 1.0)
        for i, ax in enumerate(grid):
            if i >= panels:
                ax.axis("off")
                continue
            shown = methods if i == 0 else [methods[i - 1]]
            for mf in shown:
                _draw(ax, mf, a, b, color_of[mf.label], every_label)
            ax.set_xlim(everything[:, a].min() - pad_x, everything[:, a].max() + pad_x)  # shared axes
            ax.set_ylim(everything[:, b].min() - pad_y, everything[:, b].max() + pad_y)
            ax.set_xlabel(f"{objectives[a]} (normalised)")
            ax.set_ylabel(f"{objectives[b]} (normalised)")
            ax.grid(alpha=0.3)
            if i == 0:
                ax.legend(fontsize=7, loc="best")
            else:
                ax.set_title(mf.legend, fontsize=8)
    ref = fronts[0].hv_ref
    what = "points labelled with w1" if every_label else \
        "mean point per preference over seeds (seed points faint), w1 at the ends"
    title = title or f"Pareto fronts ({what}; HV reference point {ref})"
    fig.suptitle(textwrap.fill(title, 55 * cols), fontsize=10)  # a long title wraps rather than clips (about 55
    # characters of 10 pt fit the width of one 4.6-inch panel)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
