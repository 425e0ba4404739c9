"""``meal-compare``: overlay the fronts of several runs and tabulate hypervolume per method.

    meal-compare runs/embedded/*/ --out docs/results/embedded_assistant --reference static

Each argument is a ``front.json`` or a run folder (its ``front.json``, else ``eval/front.json``).
Fronts are grouped by their label (the method); the table gives, per method, the number of runs and
the mean and standard deviation over them of the hypervolume, the MIP, how well the fronts follow
their preferences (rank correlation and range per objective, non-dominated points, degenerate
responses) and what they cost; each method's hypervolume is tested against a reference method.
All fronts must share the reference point and the reward normalisation: hypervolumes in
different units do not compare.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from collections import defaultdict
from typing import Any, Sequence

import numpy as np

from meal.evaluation.front import Front
from meal.evaluation.plotting import plot_fronts
from meal.harness.profiling import machine

log = logging.getLogger(__name__)


class CompareError(ValueError):
    """Fronts that cannot be compared; the message names the files."""


def find_front(path: str) -> str:
    if os.path.isfile(path):
        return path
    for cand in (os.path.join(path, "front.json"), os.path.join(path, "eval", "front.json")):
        if os.path.exists(cand):
            return cand
    raise CompareError(f"{path}: no front.json (run meal-eval on it first)")


def run_row(path: str, front: Front) -> dict:
    """One run's numbers: hypervolume, MIP (mean w . normalised reward), preference-following, cost."""
    return {"method": front.label or "run", "seed": front.extra.get("train_seed"), "front": path,
            "hypervolume": front.hypervolume, "mip": front.alignment, "spearman": front.spearman,
            "ranges": front.ranges, "nondominated": front.nondominated, "points": len(front.points),
            "degenerate": front.degenerate, "budget": front.extra.get("budget"),
            "conditioning_budget": front.extra.get("conditioning_budget"), "inference": front.extra.get("inference"),
            "split": front.extra.get("split", "test"), "preferences": front.preferences, "front_points": front.points,
            "pareto": front.pareto, "meta_learner": front.extra.get("meta_learner")}


NET_KEYS = ("param_distance", "param_distance_rel", "w_phi_spread_std", "w_phi_spread_range", "h_phi_spread_std",
            "h_phi_spread_range")


def _mean_std(values) -> tuple[float | None, float | None]:
    v = np.array([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return None, None
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def hypervolume_difference(a: Sequence[float], b: Sequence[float], seed: int = 0, draws: int = 10000) -> dict:
    """Mean hypervolume of ``a`` minus that of ``b``: Welch's t-test (two-sided) and a bootstrap 95%
    interval of the difference (runs resampled within each method); neither when a side has one run."""
    from scipy.stats import ttest_ind

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    out = {"difference": float(a.mean() - b.mean()), "welch_t": None, "welch_p": None}
    if len(a) > 1 and len(b) > 1 and (a.std() > 0 or b.std() > 0):
        t = ttest_ind(a, b, equal_var=False)
        out.update(welch_t=float(t.statistic), welch_p=float(t.pvalue))
    out["bootstrap_95"] = None  # with one run on a side its spread is unknown: no interval, no test
    out["levene_p"] = None  # do the seed-to-seed spreads differ? (the paper's "steadier training"; with two runs
    # a side each run is as far from its group's median as the other, and the test degenerates)
    if len(a) > 2 and len(b) > 2 and (a.std() > 0 or b.std() > 0):
        from scipy.stats import levene

        out["levene_p"] = float(levene(a, b).pvalue)
    if len(a) > 1 and len(b) > 1:
        rng = np.random.default_rng(seed)
        boot = rng.choice(a, (draws, len(a))).mean(1) - rng.choice(b, (draws, len(b))).mean(1)
        out["bootstrap_95"] = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
    return out


def _stage_cost(row: dict) -> str:
    return (f"{row['conditioning_responses'] or 0:,.0f} responses, {row['conditioning_tokens'] or 0:,.0f} tokens, "
            f"{row['conditioning_steps']:.0f} SFT steps, {(row['conditioning_seconds'] or 0) / 60:.1f} min")


def _fmt(m, s, digits=2) -> str:
    return "n/a" if m is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def experiment_meta(**fields: Any) -> dict:
    """What every results file records first: today's date and this machine, then ``fields`` (the command,
    wall time ...; a given date or machine wins)."""
    return {"date": datetime.date.today().isoformat(), "machine": machine(), **fields}


def write_results(out_dir: str, result: dict, markdown: Sequence[str]) -> None:
    """An experiment's ``result`` as ``out_dir``/compare.json and its ``markdown`` lines as README.md, closed by
    the line naming the machine, the wall time and the command that regenerates it (from ``result``)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump(result, f, indent=2)
    footer = (f"Machine: {result['machine']}. Wall time {result['wall_seconds']} s. "
              f"Regenerate: `{result['command']}`.")
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write("\n".join([*markdown, footer, ""]))


def _generation(front: Front) -> str:
    g = front.extra.get("generation")
    if g is None:  # fronts before the record: one seed per generate call, responses depended on the batch
        return "settings not recorded (an older front, sampled per batch)"
    return ", ".join(f"{k}={v}" for k, v in g.items())


def compare(paths: Sequence[str], out_dir: str, title: str | None = None, reference: str | None = None,
            meta: dict | None = None) -> dict:
    """Load the fronts, check they compare, write compare.{png,md,json} into ``out_dir``.

    Per method (fronts grouped by label): hypervolume, MIP, Spearman and range per objective, distinct
    non-dominated points, degenerate share and cost, mean ± std over runs; each method's hypervolume
    against ``reference`` (default: the first method) by Welch's test and a bootstrap interval.
    ``meta`` (date, machine, wall time ...) is written into compare.json as it is.
    """
    files = [find_front(p) for p in paths]
    fronts = [Front.load(f) for f in files]
    if not fronts:
        raise CompareError("no fronts given")
    ref, objs = fronts[0].hv_ref, fronts[0].objectives
    norm0 = fronts[0].extra.get("normalizer")
    for f, front in zip(files, fronts):
        if front.objectives != objs or front.hv_ref != ref:
            raise CompareError(f"{f}: objectives {front.objectives} / reference point {front.hv_ref} differ from "
                               f"{files[0]} ({objs} / {ref})")
        if (front.num_prompts, front.seed) != (fronts[0].num_prompts, fronts[0].seed):
            raise CompareError(f"{f}: evaluated on {front.num_prompts} test prompts with sampling seed {front.seed}, "
                               f"{files[0]} on {fronts[0].num_prompts} with seed {fronts[0].seed}: fronts over "
                               f"different prompts or samples do not compare (re-evaluate with meal-eval "
                               f"prompts={fronts[0].num_prompts} seed={fronts[0].seed})")
        if front.extra.get("split", "test") != fronts[0].extra.get("split", "test"):
            raise CompareError(f"{f}: evaluated on the {front.extra.get('split', 'test')} prompts, {files[0]} on the "
                               f"{fronts[0].extra.get('split', 'test')} prompts: fronts over different splits do not "
                               f"compare (meal-eval split=...)")
        if front.extra.get("generation") != fronts[0].extra.get("generation"):
            raise CompareError(f"{f}: sampled with {_generation(front)}, {files[0]} with {_generation(fronts[0])}: "
                               f"fronts sampled differently do not compare (re-evaluate both with this "
                               f"version's meal-eval)")
        if norm0 is not None and front.extra.get("normalizer") not in (None, norm0):
            raise CompareError(f"{f}: reward normalisation differs from {files[0]}: hypervolumes would be in "
                               f"different units (use runs of one task with the same conditioning stage or "
                               f"normalisation pass)")
    runs = [run_row(f, front) for f, front in zip(files, fronts)]
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        groups[r["method"]].append(r)
    reference = reference or next(iter(groups))
    if reference not in groups:
        raise CompareError(f"--reference {reference!r} is none of the methods {sorted(groups)}")
    rows = []
    for label, members in groups.items():
        row = {"method": label, "runs": len(members), "seeds": [m["seed"] for m in members],
               "hypervolumes": [m["hypervolume"] for m in members]}
        for key in ("hypervolume", "mip", "nondominated", "degenerate"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std(m[key] for m in members)
        row["alignment_mean"], row["alignment_std"] = row["mip_mean"], row["mip_std"]
        for k, name in enumerate(objs):
            row[f"spearman_{name}_mean"], row[f"spearman_{name}_std"] = _mean_std(m["spearman"][k] if m["spearman"]
                                                                                  else None for m in members)
            row[f"range_{name}_mean"], row[f"range_{name}_std"] = _mean_std(m["ranges"][k] if m["ranges"]
                                                                            else None for m in members)
        for key in ("responses", "tokens", "reward_calls", "steps", "seconds"):
            row[f"{key}_mean"], _ = _mean_std((m["budget"] or {}).get(key) for m in members)
            row[f"conditioning_{key}"], _ = _mean_std((m["conditioning_budget"] or {}).get(key) for m in members)
        for key in ("upstream_seconds_per_response", "corrector_seconds_per_response",
                    "corrector_tokens_per_response"):  # a corrector's per-response cost (MetaAligner)
            row[f"inference_{key}"], _ = _mean_std((m["inference"] or {}).get(key) for m in members)
        for key in NET_KEYS:  # what the meta-learner did (Meal runs)
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std((m["meta_learner"] or {}).get(f"meta/{key}")
                                                              for m in members)
        if label != reference:
            row[f"vs_{reference}"] = hypervolume_difference(row["hypervolumes"], groups[reference] and
                                                            [m["hypervolume"] for m in groups[reference]])
        rows.append(row)
    os.makedirs(out_dir, exist_ok=True)
    png = plot_fronts(fronts, os.path.join(out_dir, "compare.png"), title=title)
    md = [f"Hypervolume (reference point {ref}, normalised units), MIP (mean w . normalised reward), "
          f"preference-following (Spearman rank correlation between w_k and reward k over the grid; range: "
          f"reward k at the largest w_k minus at the smallest; distinct non-dominated points of "
          f"{len(fronts[0].points)}; degenerate responses) and online cost; mean ± std over runs.", "",
          "| method | runs | hypervolume | MIP | " + " | ".join(f"Spearman {o}" for o in objs) + " | "
          + " | ".join(f"range {o}" for o in objs) + " | non-dominated | degenerate | responses | tokens | "
          "steps | minutes |",
          "|---" * (10 + 2 * len(objs)) + "|"]
    for r in rows:
        md.append(f"| {r['method']} | {r['runs']} | {_fmt(r['hypervolume_mean'], r['hypervolume_std'])} | "
                  f"{_fmt(r['mip_mean'], r['mip_std'])} | "
                  + " | ".join(_fmt(r[f"spearman_{o}_mean"], r[f"spearman_{o}_std"]) for o in objs) + " | "
                  + " | ".join(_fmt(r[f"range_{o}_mean"], r[f"range_{o}_std"]) for o in objs) + " | "
                  f"{_fmt(r['nondominated_mean'], r['nondominated_std'], 1)} | "
                  f"{100 * (r['degenerate_mean'] or 0):.1f}% | {r['responses_mean'] or 0:,.0f} | "
                  f"{r['tokens_mean'] or 0:,.0f} | {r['steps_mean'] or 0:.0f} | {(r['seconds_mean'] or 0) / 60:.1f} |")
    md.append("")
    md.append("Hypervolume per run: " + "; ".join(f"{r['method']} {', '.join(f'{h:.2f}' for h in r['hypervolumes'])}"
                                                  for r in rows) + ".")
    groups_std = {r["method"]: r["hypervolume_std"] or 0.0 for r in rows}
    for r in rows:
        d = r.get(f"vs_{reference}")
        if d:
            if d["bootstrap_95"] is None:
                md.append(f"{r['method']} - {reference}: hypervolume difference {d['difference']:+.2f} (one run on "
                          f"a side: no test, no interval).")
                continue
            p = "n/a" if d["welch_p"] is None else f"{d['welch_p']:.3f}"
            lev = "n/a" if d.get("levene_p") is None else f"{d['levene_p']:.3f}"
            md.append(f"{r['method']} - {reference}: hypervolume difference {d['difference']:+.2f}, Welch's test "
                      f"p = {p}, bootstrap 95% interval [{d['bootstrap_95'][0]:+.2f}, {d['bootstrap_95'][1]:+.2f}]; "
                      f"seed-to-seed spread {r['hypervolume_std']:.2f} vs {groups_std[reference]:.2f}, "
                      f"Levene p = {lev}.")
    for r in rows:
        if r["param_distance_mean"] is not None:
            md.append(f"{r['method']}: the net moved {_fmt(r['param_distance_mean'], r['param_distance_std'], 3)} "
                      f"from its initialisation ({_fmt(r['param_distance_rel_mean'], r['param_distance_rel_std'], 3)} "
                      f"of its norm); over every training prompt at w* = uniform its w_phi spans "
                      f"{_fmt(r['w_phi_spread_range_mean'], r['w_phi_spread_range_std'], 3)} (std "
                      f"{_fmt(r['w_phi_spread_std_mean'], r['w_phi_spread_std_std'], 3)}) and its relabelling head "
                      f"{_fmt(r['h_phi_spread_range_mean'], r['h_phi_spread_range_std'], 3)} (max - min, largest over "
                      f"objectives).")
    for r in rows:
        if r["inference_corrector_seconds_per_response"] is not None:
            md.append(f"{r['method']}: inference per response {r['inference_upstream_seconds_per_response']:.2f} s "
                      f"for the policy + {r['inference_corrector_seconds_per_response']:.2f} s for the corrector "
                      f"({r['inference_corrector_tokens_per_response']:.1f} corrector tokens); its online cost "
                      f"above is the corrector's training, whatever policy it is stacked on.")
    stages: dict[str, list[str]] = defaultdict(list)  # a stage's cost -> the methods that started from it
    for r in rows:
        if r["conditioning_steps"]:
            stages[_stage_cost(r)].append(r["method"])
    if len(stages) == 1:  # one stage every method started from (paid once)
        md.append(f"Conditioning stage (shared, not in the online cost above): {next(iter(stages))}.")
    elif stages:
        md.append("Conditioning stages (not in the online cost above): "
                  + "; ".join(f"{', '.join(methods)}: {cost}" for cost, methods in stages.items()) + ".")
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    result = {**(meta or {}), "objectives": objs, "hv_ref": ref, "reference_method": reference, "methods": rows,
              "runs": runs, "figure": png}
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump(result, f, indent=2)
    print("\n".join(md))
    print(f"\nfigure: {png}")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="meal-compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="front.json files or run folders")
    ap.add_argument("--out", default="compare", help="output folder (compare.png, compare.md, compare.json)")
    ap.add_argument("--title", default=None)
    ap.add_argument("--reference", default=None, help="method the others' hypervolumes are tested against "
                    "(default: the first)")
    ap.add_argument("--meta", default=None, help="JSON object written into compare.json (date, machine, wall time); "
                    "date and machine default to today and this machine (meal.harness.profiling.machine)")
    args = ap.parse_args(argv)
    try:
        try:
            meta = json.loads(args.meta) if args.meta else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"--meta is not valid JSON ({e}): {args.meta!r}") from None
        if not isinstance(meta, dict):
            raise ValueError(f"--meta must be a JSON object, got {args.meta!r}")
        meta = experiment_meta(**meta)
        compare(args.paths, args.out, args.title, args.reference, meta)
    except (CompareError, ValueError) as e:
        print(f"meal-compare: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
