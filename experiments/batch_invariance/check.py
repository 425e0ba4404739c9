"""Issue 25's check on the embedded policy: one checkpoint evaluated at several batch sizes (run.sh).

Counts, against the smallest batch size, the responses that differ (of prompts x preferences) and how
many of those differ from their first token, and the hypervolume at each batch size against the
seed-to-seed spread of the comparison the run belongs to. Writes compare.json (every front's points,
the counts, the command) and README.md into --out.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os

import numpy as np

from meal.cli.compare import experiment_meta, write_results
from meal.evaluation.front import Front


def responses(folder: str) -> dict[tuple[str, int], str]:
    """(preference file, row) -> response text, from meal-eval's responses/ CSVs."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "responses", "*.csv"))):
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                out[(os.path.basename(path), int(row[""]))] = row["response"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_root", help="folder holding bs<N>/ evaluations")
    ap.add_argument("--batches", nargs="+", type=int, required=True)
    ap.add_argument("--spread-from", required=True, help="compare.json whose method of this run gives the seed spread")
    ap.add_argument("--out", required=True)
    ap.add_argument("--command", required=True)
    ap.add_argument("--wall", type=int, default=0)
    args = ap.parse_args()
    fronts = {b: Front.load(os.path.join(args.out_root, f"bs{b}", "front.json")) for b in args.batches}
    texts = {b: responses(os.path.join(args.out_root, f"bs{b}")) for b in args.batches}
    ref = min(args.batches)
    rows = []
    for b in args.batches:
        keys = texts[ref].keys()
        if texts[b].keys() != keys:
            raise SystemExit(f"bs{b}: its responses are not those of bs{ref} (other prompts or preferences)")
        differ = [k for k in keys if texts[b][k] != texts[ref][k]]
        first = [k for k in differ if texts[b][k].split()[:1] != texts[ref][k].split()[:1]]
        seconds = open(os.path.join(args.out_root, f"bs{b}", "seconds")).read().strip()
        rows.append({"batch_size": b, "hypervolume": fronts[b].hypervolume, "points": fronts[b].points,
                     "preferences": fronts[b].preferences, "responses": len(keys), "differ_from_bs1": len(differ),
                     "differ_from_first_word": len(first), "eval_seconds": int(seconds),
                     "generation": fronts[b].extra.get("generation")})
    hv = np.array([r["hypervolume"] for r in rows])
    spread = json.load(open(args.spread_from))
    label = fronts[ref].label
    method = next(m for m in spread["methods"] if m["method"] == label)
    result = experiment_meta(experiment="batch invariance of a front (issue 25)", wall_seconds=args.wall,
                             command=args.command, run=fronts[ref].extra.get("run_dir"), method=label,
                             reference_batch_size=ref, batches=rows, hypervolume_range=float(hv.max() - hv.min()),
                             seed_spread={"from": args.spread_from, "method": label, "runs": method["runs"],
                                          "hypervolume_std": method["hypervolume_std"]})
    lines = [f"# Does a front depend on the generation batch size? ({result['date']})", "",
             f"One checkpoint ({label}, {result['run']}) evaluated by meal-eval at batch sizes "
             f"{', '.join(map(str, args.batches))}: {rows[0]['responses']} responses each (prompts x 11 preferences), "
             f"each drawn with its own seed (`seeding=row`, docs/design.md \"Evaluation\").", "",
             "| batch size | hypervolume | responses differing from batch size %d | of them from the first word | "
             "eval seconds |" % ref, "|---|---|---|---|---|"]
    lines += [f"| {r['batch_size']} | {r['hypervolume']:.4f} | {r['differ_from_bs1']} of {r['responses']} | "
              f"{r['differ_from_first_word']} | {r['eval_seconds']} |" for r in rows]
    lines += ["", f"Hypervolume range over batch sizes: {result['hypervolume_range']:.4f}; seed-to-seed std of "
              f"{label} in {args.spread_from}: {method['hypervolume_std']:.2f} ({method['runs']} runs).", ""]
    write_results(args.out, result, lines)
    print(open(os.path.join(args.out, "README.md")).read())


if __name__ == "__main__":
    main()
