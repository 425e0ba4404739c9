"""What a meta-learner comparison shows, from its compare.json: Meal against every other method with two or
more runs (Welch's t-test, a bootstrap interval, Levene's test of the seed-to-seed spreads), where each
single-run control falls among Meal's runs, and the scale the evidence points to: how many seeds a side
would detect the observed Meal - static difference (two-sided alpha 0.05, power 0.8, normal approximation
with the pooled seed-to-seed standard deviation) and the smallest difference the runs at hand can detect.

Run: ``python experiments/meta_learner/summary.py docs/results/meta_learner_test/compare.json``; writes
``summary.json`` beside it and prints the lines the README quotes.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
from scipy.stats import norm

from meal.cli.compare import hypervolume_difference


def seeds_needed(delta: float, sigma: float, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """Runs a side for a two-sample test to detect ``delta`` at seed-to-seed std ``sigma``."""
    if delta == 0 or not math.isfinite(sigma):
        return None
    z = norm.ppf(1 - alpha / 2) + norm.ppf(power)
    return float(2 * (z * sigma / delta) ** 2)


def detectable(sigma: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest difference ``n`` runs a side detect at ``sigma`` (same approximation)."""
    return float((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * sigma * math.sqrt(2 / n))


def summarise(compare: dict, learner: str = "meal", reference: str = "static") -> dict:
    hv = {m["method"]: m["hypervolumes"] for m in compare["methods"]}
    meal = np.asarray(hv[learner], dtype=float)
    out = {"learner": learner, "reference": reference, "hypervolumes": hv, "pairs": {}, "single_runs": {}}
    for method, values in hv.items():
        if method == learner:
            continue
        if len(values) > 1:
            out["pairs"][method] = hypervolume_difference(meal, values)
        else:
            z = (values[0] - meal.mean()) / meal.std(ddof=1) if len(meal) > 1 else None
            out["single_runs"][method] = {"hypervolume": values[0], "minus_learner_mean": values[0] - meal.mean(),
                                          "z_among_learner_runs": z,
                                          "learner_runs_below": int((meal < values[0]).sum()),
                                          "learner_runs": len(meal)}
    ref = np.asarray(hv[reference], dtype=float)
    pooled = math.sqrt((meal.var(ddof=1) * (len(meal) - 1) + ref.var(ddof=1) * (len(ref) - 1))
                       / (len(meal) + len(ref) - 2))
    delta = float(meal.mean() - ref.mean())
    out["scale"] = {"difference": delta, "pooled_std": pooled, "seeds_per_side_needed": seeds_needed(delta, pooled),
                    "detectable_difference_at_these_runs": detectable(pooled, min(len(meal), len(ref)))}
    nets = [r["meta_learner"] for r in compare["runs"] if r["method"] == learner and r.get("meta_learner")]
    out["net"] = {key: [n.get(key) for n in nets] for key in ("meta/param_distance", "meta/w_phi_spread_range",
                                                               "meta/w_phi_spread_std")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("compare_json")
    ap.add_argument("--learner", default="meal")
    ap.add_argument("--reference", default="static")
    args = ap.parse_args()
    compare = json.load(open(args.compare_json))
    out = summarise(compare, args.learner, args.reference)
    path = os.path.join(os.path.dirname(args.compare_json), "summary.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    for method, d in out["pairs"].items():
        boot, lev = d["bootstrap_95"], d["levene_p"]
        print(f"{args.learner} - {method}: {d['difference']:+.3f}, Welch p = {d['welch_p']:.3f}, bootstrap 95% "
              f"[{boot[0]:+.2f}, {boot[1]:+.2f}], Levene p = {'n/a' if lev is None else f'{lev:.3f}'}")
    for method, d in out["single_runs"].items():
        print(f"{method} (1 run): {d['hypervolume']:.3f}, {d['minus_learner_mean']:+.3f} against {args.learner}'s "
              f"mean, above {d['learner_runs_below']} of its {d['learner_runs']} runs")
    s = out["scale"]
    print(f"scale: difference {s['difference']:+.3f}, pooled seed-to-seed std {s['pooled_std']:.3f}: "
          f"{s['seeds_per_side_needed'] or float('nan'):.0f} seeds a side to detect it; these runs detect "
          f"{s['detectable_difference_at_these_runs']:.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
