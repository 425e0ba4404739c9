"""Figures of fronts, as in the paper: every point labelled with its w1; K = 3 as pairwise projections."""

from __future__ import annotations

import itertools
import textwrap
from typing import Sequence

from meal.evaluation import Front, pareto_mask


def plot_fronts(fronts: Sequence[Front], path: str, title: str | None = None) -> str:
    """Overlay one or more fronts in one figure (one panel per objective pair) and save it as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = fronts[0].objectives
    pairs = list(itertools.combinations(range(len(objectives)), 2))
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.4), squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = list(dict.fromkeys(f.label or "run" for f in fronts))  # one colour per method
    color_of = {lab: cycle[i % len(cycle)] for i, lab in enumerate(labels)}
    hv_of = {lab: [f.hypervolume for f in fronts if (f.label or "run") == lab] for lab in labels}
    for ax, (a, b) in zip(axes[0], pairs):
        seen = set()
        for front in fronts:
            lab = front.label or "run"
            color = color_of[lab]
            xs = [p[a] for p in front.points]
            ys = [p[b] for p in front.points]
            hvs = hv_of[lab]
            legend = None if lab in seen else (f"{lab} (HV {front.hypervolume:.3f})" if len(hvs) == 1 else
                                                f"{lab} (HV {sum(hvs) / len(hvs):.3f}, {len(hvs)} runs)")
            seen.add(lab)
            alpha = 0.9 if len(hvs) == 1 else 0.55
            ax.scatter(xs, ys, color=color, alpha=alpha, s=22, label=legend)
            # the non-dominated points of this projection, joined in order: the front as drawn in the papers
            front_idx = sorted(pareto_mask(list(zip(xs, ys))).nonzero()[0], key=lambda i: xs[i])
            ax.plot([xs[i] for i in front_idx], [ys[i] for i in front_idx], "-", color=color, alpha=alpha)
            at: dict[tuple[float, float], list[str]] = {}  # coincident points share one label
            for x, y, w in zip(xs, ys, front.preferences):
                at.setdefault((round(x, 6), round(y, 6)), []).append(f"{w[0]:.1f}")
            on_front = {(round(xs[i], 6), round(ys[i], 6)) for i in front_idx}
            for (x, y), names in at.items():
                # labels of the front above and right of it, of dominated points below and left (inside the
                # front, where the front's own labels are not)
                up = (x, y) in on_front
                ax.annotate(",".join(names), (x, y), textcoords="offset points", xytext=(4, 4) if up else (-4, -4),
                            ha="left" if up else "right", va="bottom" if up else "top", fontsize=7, color=color)
        ax.set_xlabel(f"{objectives[a]} (normalised)")
        ax.set_ylabel(f"{objectives[b]} (normalised)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best")
    ref = fronts[0].hv_ref
    title = title or f"Pareto fronts (points labelled with w1; HV reference point {ref})"
    fig.suptitle(textwrap.fill(title, 75 * len(pairs)), fontsize=10)  # a long title wraps rather than clips
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
