"""Do the embedded objectives conflict? Sample responses from the embedded policy and measure.

For each embedded task: sample N responses per training prompt under random preferences, score
every embedded reward, and write the Pearson and Spearman correlations between objectives plus
the share of non-dominated responses per prompt to ``docs/reward_conflict.json`` (and print a
Markdown table). Run: ``python experiments/embedded/reward_conflict.py [--prompts 24 --samples 4]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import numpy as np
import torch
from omegaconf import OmegaConf

from meal.config import PolicyConfig, TemplateConfig
from meal.evaluation.front import pareto_mask
from meal.policy.model import load_policy
from meal.policy.rollout import ConditionedPolicy, Conditioner, Queries, Scoring, draw_preferences, rollout
from meal.policy.sampling import GenerationSettings
from meal.rewards import RewardSet
from meal.tasks import load_embedded

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rank(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(float)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "reward_conflict.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    policy_cfg = OmegaConf.merge(OmegaConf.structured(PolicyConfig), OmegaConf.load(
        os.path.join(ROOT, "conf", "policy", "smollm2_embedded.yaml")))
    model, tok = load_policy(policy_cfg, 2)  # both embedded tasks are scored here under 2-objective prompts
    specs = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf", "rewards", "embedded.yaml")))
    results = {}
    for task in ("summary_embedded", "assistant_embedded"):
        tcfg = OmegaConf.load(os.path.join(ROOT, "conf", "task", f"{task}.yaml"))
        objectives = ["coverage", "faithful", "concise"] if task.startswith("summary") else \
            ["helpful", "concise", "positive", "harmless"]
        template = OmegaConf.merge(OmegaConf.structured(TemplateConfig), tcfg.template)
        cond = Conditioner(template, list(tcfg.objectives), tok)
        texts = [e.text for e in load_embedded(tcfg.data.name).train[:args.prompts]]
        prefs = draw_preferences(len(texts), len(tcfg.objectives), 1.0, np.random.default_rng(0))
        t0 = time.time()
        ro = rollout(ConditionedPolicy(model, cond), Queries(texts, prefs, args.samples),
                     GenerationSettings(tcfg.max_new_tokens), Scoring(RewardSet.from_config(specs, objectives)))
        raw = ro.raw.reshape(-1, len(objectives)).numpy()  # (M, K)
        pairs = {}
        for a, b in itertools.combinations(range(len(objectives)), 2):
            x, y = raw[:, a], raw[:, b]
            ok = x.std() > 0 and y.std() > 0
            pairs[f"{objectives[a]}~{objectives[b]}"] = {
                "pearson": float(np.corrcoef(x, y)[0, 1]) if ok else None,
                "spearman": float(np.corrcoef(rank(x), rank(y))[0, 1]) if ok else None}
        main_k = [objectives.index(o) for o in tcfg.objectives]
        nd = [pareto_mask(ro.raw[i][:, main_k].numpy()).mean() for i in range(len(texts))]
        results[task] = {"objectives": objectives, "responses": int(raw.shape[0]), "pairs": pairs,
                         "mean": dict(zip(objectives, raw.mean(0).tolist())),
                         "std": dict(zip(objectives, raw.std(0).tolist())),
                         "non_dominated_share_per_prompt": float(np.mean(nd)), "task_objectives": list(tcfg.objectives),
                         "seconds": round(time.time() - t0, 1)}
        print(f"\n{task}: {raw.shape[0]} responses; non-dominated share per prompt over "
              f"{tcfg.objectives}: {np.mean(nd):.2f}")
        print("| pair | Pearson | Spearman |\n|---|---|---|")
        for name, v in pairs.items():
            fmt = lambda z: "n/a" if z is None else f"{z:+.2f}"  # noqa: E731
            print(f"| {name} | {fmt(v['pearson'])} | {fmt(v['spearman'])} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
