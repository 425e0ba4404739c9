"""Learning curves of Meal runs and its controls: validation hypervolume and preference-following against
the online budget, beside what the net did (distance from its initialisation, spread of w_phi over the
training prompts at a fixed w*), per method as mean ± std over seeds.

Reads each run folder's metrics.jsonl (``val/*`` rows written by the periodic evaluation, ``meta/*`` in the
iteration rows) and config.yaml; writes ``curves.json`` (every run's curve, and the per-method means) and
``curves.png`` into ``--out``. Run: ``python experiments/meta_learner/curves.py RUN... --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import numpy as np
from omegaconf import OmegaConf

PANELS = [("val/hypervolume", "validation hypervolume (8 prompts, 3 preferences)"),
          ("val/range/concise", "concise range over the 3 preferences (validation)"),
          ("meta/param_distance", "net: distance from its initialisation"),
          ("meta/w_phi_spread_range", "net: w_phi max - min over training prompts, w* uniform")]


def run_curve(run: str) -> dict:
    """One run's method, seed and, per metric of PANELS, the (step, value) pairs it logged."""
    cfg = OmegaConf.load(os.path.join(run, "config.yaml"))
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    curve = {key: [(r["step"], r[key]) for r in rows if key in r] for key, _ in PANELS}
    return {"run": run, "method": cfg.method.name, "seed": int(cfg.trainer.seed),
            "responses_per_iteration": int(cfg.trainer.batch_size * cfg.trainer.n_samples), "curves": curve}


def mean_curves(runs: list[dict]) -> dict:
    """method -> metric -> {steps, mean, std, runs} over the runs that logged every step."""
    out: dict = defaultdict(dict)
    by_method = defaultdict(list)
    for r in runs:
        by_method[r["method"]].append(r)
    for method, members in by_method.items():
        for key, _ in PANELS:
            series = [dict(m["curves"][key]) for m in members if m["curves"][key]]
            if not series:
                continue
            steps = sorted(set.intersection(*(set(s) for s in series)))
            vals = np.array([[s[t] for t in steps] for s in series])
            out[method][key] = {"steps": steps, "mean": vals.mean(0).tolist(),
                                "std": (vals.std(0, ddof=1) if len(series) > 1 else 0 * vals[0]).tolist(),
                                "runs": len(series)}
    return dict(out)


def plot(means: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
    for ax, (key, title) in zip(axes, PANELS):
        for method, curves in sorted(means.items()):
            c = curves.get(key)
            if c is None:
                continue
            x, m, s = np.array(c["steps"]), np.array(c["mean"]), np.array(c["std"])
            ax.plot(x, m, marker="o", label=f"{method} ({c['runs']})")
            ax.fill_between(x, m - s, m + s, alpha=0.15)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration (32 sampled responses each)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    runs = [run_curve(r) for r in args.runs]
    means = mean_curves(runs)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "curves.json"), "w") as f:
        json.dump({"means": means, "runs": runs}, f, indent=2)
    plot(means, os.path.join(args.out, "curves.png"))
    for method, curves in sorted(means.items()):
        hv = curves.get("val/hypervolume")
        if hv:
            print(method, "val/hypervolume", " ".join(f"{t}:{m:.2f}±{s:.2f}" for t, m, s in
                                                       zip(hv["steps"], hv["mean"], hv["std"])))
    print(f"curves: {os.path.join(args.out, 'curves.png')}")


if __name__ == "__main__":
    main()
