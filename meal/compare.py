"""``meal-compare``: overlay the fronts of several runs and tabulate hypervolume per method.

    meal-compare runs/embedded/*/ --out docs/compare_embedded

Each argument is a ``front.json`` or a run folder (its ``front.json``, else ``eval/front.json``).
Fronts are grouped by their label (the method); the table gives, per method, the number of runs,
the hypervolume's mean and standard deviation over them, and the same for preference alignment.
All fronts must share the reference point and the reward normalisation: hypervolumes in
different units do not compare.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import defaultdict
from typing import Sequence

import numpy as np

from meal.evaluation import Front
from meal.plotting import plot_fronts

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


def compare(paths: Sequence[str], out_dir: str, title: str | None = None) -> dict:
    """Load the fronts, check they compare, write compare.{png,md,json} into ``out_dir``."""
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
        if norm0 is not None and front.extra.get("normalizer") not in (None, norm0):
            raise CompareError(f"{f}: reward normalisation differs from {files[0]}: hypervolumes would be in "
                               f"different units (train both with the same trainer.norm_seed and pass settings)")
    groups: dict[str, list[tuple[str, Front]]] = defaultdict(list)
    for f, front in zip(files, fronts):
        groups[front.label or "run"].append((f, front))
    rows = []
    for label, members in groups.items():
        hv = np.array([m.hypervolume for _, m in members])
        al = np.array([m.alignment for _, m in members])
        rows.append({"method": label, "runs": len(members),
                     "seeds": [m.extra.get("train_seed") for _, m in members],
                     "hypervolume_mean": float(hv.mean()), "hypervolume_std": float(hv.std(ddof=1)) if len(hv) > 1
                     else 0.0, "alignment_mean": float(al.mean()),
                     "alignment_std": float(al.std(ddof=1)) if len(al) > 1 else 0.0,
                     "hypervolumes": hv.tolist(), "fronts": [f for f, _ in members]})
    os.makedirs(out_dir, exist_ok=True)
    png = plot_fronts(fronts, os.path.join(out_dir, "compare.png"), title=title)
    md = [f"Hypervolume (reference point {ref}, normalised units; mean ± std over runs) and alignment "
          f"(mean w . normalised reward).", "",
          "| method | runs | hypervolume | alignment | per run |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['method']} | {r['runs']} | {r['hypervolume_mean']:.3f} ± {r['hypervolume_std']:.3f} | "
                  f"{r['alignment_mean']:.3f} ± {r['alignment_std']:.3f} | "
                  f"{', '.join(f'{h:.3f}' for h in r['hypervolumes'])} |")
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    result = {"objectives": objs, "hv_ref": ref, "methods": rows, "figure": png}
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
    args = ap.parse_args(argv)
    try:
        compare(args.paths, args.out, args.title)
    except (CompareError, ValueError) as e:
        print(f"meal-compare: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
