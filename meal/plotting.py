"""Figures of fronts, as in the paper: every point labelled with its w1; K = 3 as pairwise projections."""

from __future__ import annotations

import itertools
from typing import Sequence

from meal.evaluation import Front


def plot_fronts(fronts: Sequence[Front], path: str, title: str | None = None) -> str:
    """Overlay one or more fronts in one figure (one panel per objective pair) and save it as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = fronts[0].objectives
    pairs = list(itertools.combinations(range(len(objectives)), 2))
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (a, b) in zip(axes[0], pairs):
        for n, front in enumerate(fronts):
            color = colors[n % len(colors)]
            xs = [p[a] for p in front.points]
            ys = [p[b] for p in front.points]
            label = f"{front.label or 'run'} (HV {front.hypervolume:.3f})"
            ax.plot(xs, ys, "-o", color=color, alpha=0.85, markersize=5, label=label)
            for x, y, w in zip(xs, ys, front.preferences):
                ax.annotate(f"{w[0]:.1f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=color)
        ax.set_xlabel(f"{objectives[a]} (normalised)")
        ax.set_ylabel(f"{objectives[b]} (normalised)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best")
    ref = fronts[0].hv_ref
    fig.suptitle(title or f"Pareto fronts (points labelled with w1; HV reference point {ref})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
