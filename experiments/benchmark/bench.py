"""``make bench``: time and peak memory per phase of an iteration, static vs Meal with each engine.

Every variant trains on the embedded default (SmolLM2-135M-Instruct + LoRA, the demo's batch: B = 8
prompts, N = 4 samples, 48 new tokens) for ``--iterations`` iterations in a fresh process (so that
memory is not shared), through the real training loop; the first iteration is a warm-up and is
dropped. Phases are those the trainer meters: generate, score, inner_step (the virtual step),
meta_step (meta loss, its gradient, the hypergradient, the net's step) and real_step (the policy's
AdamW step). Times come from one run per variant; memory from a second run (CPU: RSS sampled every
ms, with MALLOC_MMAP_THRESHOLD_=65536 so that freed memory is returned to the OS, which slows that
run down; CUDA: allocator peak): each phase's peak above what was resident when it began.

It also checks that the engines give the same meta-gradient on one real batch (cosine similarity
to the autograd engine), then writes ``experiments/benchmark/results.json`` and ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys

from meal.harness.profiling import machine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VARIANTS = {
    "static": ["method=static"],
    "meal/directional-fd": ["method=meal", "method.engine=directional", "method.directional_mode=fd"],
    "meal/directional-jvp": ["method=meal", "method.engine=directional", "method.directional_mode=jvp"],
    "meal/directional-per_example": ["method=meal", "method.engine=directional",
                                     "method.directional_mode=per_example"],
    "meal/autograd": ["method=meal", "method.engine=autograd"],
}
PHASES = ["generate", "score", "inner_step", "meta_step", "real_step"]


def run_variant(name: str, overrides: list[str], iterations: int, out_root: str, memory: bool) -> list[dict]:
    """One training run of the variant in a fresh process; ``memory``: the pass that measures memory."""
    out = os.path.join(out_root, name.replace("/", "_") + ("-memory" if memory else "-time"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if memory:  # glibc returns freed blocks >= 64 KiB to the OS, so RSS follows live memory (but runs slower)
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, "-m", "meal.cli.train", "experiment=demo", *overrides, f"trainer.iterations={iterations}",
           "trainer.final_eval=false", "trainer.eval_every=0", "trainer.save_every=0", "trainer.table_every=0",
           "logger=none", f"trainer.out_dir={out}", "hydra.run.dir=" + os.path.join(out, "hydra")]
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"train/loss"' in line]


def summarise(timed: list[dict], metered: list[dict]) -> dict:
    """Mean seconds from the timing pass and peak memory from the memory pass, warm-up dropped."""
    timed, metered = timed[1:], metered[1:]
    out = {"iterations": len(timed), "iteration_s": statistics.mean(r["time/iteration"] for r in timed)}
    for p in PHASES:
        out[f"{p}_s"] = statistics.mean(r.get(f"time/{p}", 0.0) for r in timed)
        out[f"{p}_mb"] = max(r.get(f"memory/{p}_mb", 0.0) for r in metered)
    out["meta_total_s"] = out["inner_step_s"] + out["meta_step_s"]
    out["meta_peak_mb"] = max(out["inner_step_mb"], out["meta_step_mb"])
    return out


def engine_agreement() -> dict:
    """Cosine similarity of each engine's meta-gradient to autograd's on one batch of the embedded model."""
    code = r'''
import json, torch, numpy as np
from hydra import compose, initialize_config_dir
from meal.config import register_configs
from meal.methods import typed_config
from meal.policy.model import load_policy, trainable_parameters
from meal.policy.losses import build_batch, per_example_nll
from meal.methods.bilevel import (InnerLoss, MetaGradSettings, PreferenceWeightNet, PromptFeatures, dynamic_preference,
                       label_preference, sample_weights, meta_gradient)
from meal.tasks import load_embedded
from meal.policy.rollout import ConditionedPolicy, Conditioner, Queries, Scoring, rollout
from meal.rewards import RewardSet
from meal.harness.settings import generation_settings
from meal.policy.embeddings import policy_embeddings
register_configs()
with initialize_config_dir(config_dir=ROOT + "/conf", version_base="1.3"):
    cfg = typed_config(compose(config_name="config", overrides=["experiment=demo"]))
torch.manual_seed(0)
model, tok = load_policy(cfg.policy, len(cfg.task.objectives))
params = trainable_parameters(model)
data = load_embedded("assistant")
texts = [e.text for e in data.train[:8]]
cond = Conditioner(cfg.task.template, list(cfg.task.objectives), tok)
rs = RewardSet.from_config(dict(cfg.rewards), list(cfg.task.objectives))
w = torch.distributions.Dirichlet(torch.ones(2)).sample((8,))
ro = rollout(ConditionedPolicy(model, cond), Queries(texts, w, 1, seed=0), generation_settings(cfg), Scoring(rs))
resp = [r[0] for r in ro.texts]
inner = build_batch(tok, cond(texts[:4], w[:4]), resp[:4], prefs=w[:4])
meta = build_batch(tok, cond(texts[4:], w[4:]), resp[4:], prefs=w[4:])
with torch.no_grad():  # move B off zero so that every LoRA factor has a gradient
    for n, p in params.items():
        if "lora_B" in n: p.normal_(0, 1e-3)
z = PromptFeatures.fit(policy_embeddings(model, tok, texts), 4)(policy_embeddings(model, tok, texts[:4]))
net = PreferenceWeightNet(z.shape[1], 2, 128, cfg.method.tau)
with torch.no_grad():  # past the initialisation, so that every layer of the net receives a gradient
    for head in (net.proposal, net.relabelling): head[2].weight.normal_(0, 0.1)
R = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
lam = cfg.method.lam
inner_loss = InnerLoss(inner, lambda: sample_weights(net(z, w[:4]), R, lam),
                       lambda: label_preference(dynamic_preference(w[:4], net(z, w[:4]), lam),
                                                net.relabel(z, w[:4], R), lam))
out = {}
from torch.nn.attention import SDPBackend, sdpa_kernel
for name, kw in [("autograd", dict(engine="autograd")), ("directional-jvp", dict(engine="directional", mode="jvp")),
                 ("directional-fd", dict(engine="directional", mode="fd")),
                 ("directional-per_example", dict(engine="directional", mode="per_example"))]:
    net.zero_grad()
    with sdpa_kernel(SDPBackend.MATH):
        meta_gradient(model, params, inner_loss, lambda p: per_example_nll(model, meta, p).mean(),
                      list(net.parameters()), MetaGradSettings(cfg.trainer.lr, fd_eps=cfg.method.fd_eps, **kw))
    out[name] = torch.cat([p.grad.flatten() for p in net.parameters()]).double()
ref = out["autograd"]
print(json.dumps({k: float(torch.nn.functional.cosine_similarity(v, ref, dim=0)) for k, v in out.items()}
                 | {"autograd_norm": float(ref.norm())}))
'''
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", f"ROOT = {ROOT!r}\n" + code], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_markdown(results: dict, path: str) -> None:
    v = results["variants"]
    s = v["static"]
    lines = [
        "# Benchmarks", "",
        f"Measured by `make bench` on {results['date']} on {results['machine']}.",
        f"Setting: the demo's (embedded SmolLM2-135M-Instruct, bf16 where supported, LoRA r 16 on q,v; B = 8 "
        f"prompts, N = 4 samples, 48 new tokens, micro-batch 8); mean over {s['iterations']} iterations after one "
        f"warm-up. Memory (from a separate run, see `experiments/benchmark/bench.py`): the phase's peak above "
        f"what was resident when it began (activations and temporaries).",
        "", "## Time per iteration (seconds) and peak memory (MB) per phase", "",
        "| variant | generate | score | inner step | meta step | real step | iteration | meta peak MB | "
        "real-step peak MB |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in v.items():
        lines.append(f"| {name} | {r['generate_s']:.2f} | {r['score_s']:.2f} | {r['inner_step_s']:.2f} | "
                     f"{r['meta_step_s']:.2f} | {r['real_step_s']:.2f} | {r['iteration_s']:.2f} | "
                     f"{r['meta_peak_mb']:.0f} | {r['real_step_mb']:.0f} |")
    lines += ["", "## Ratios against the targets of the meta-learner issue", "",
              "| variant | Meal / static iteration (target <= 1.3) | meta step / real step time (target <= 1.5) | "
              "meta / real-step peak memory (target <= 1.2) |", "|---|---|---|---|"]
    for name, r in v.items():
        if name == "static":
            continue
        lines.append(f"| {name} | {r['iteration_s'] / s['iteration_s']:.2f} | "
                     f"{r['meta_total_s'] / r['real_step_s']:.2f} | "
                     f"{r['meta_peak_mb'] / max(r['real_step_mb'], 1e-9):.2f} |")
    lines += ["", "Every variant samples the same number of responses; the generate column still varies by about 15% "
              "between runs (response lengths and machine noise), so the iteration ratio is noisier than the "
              "meta-step ratio, which compares phases measured within one run."]
    agree = results.get("agreement")
    if agree:
        lines += ["", "## Same answer", "",
                  "Cosine similarity of each engine's meta-gradient to the autograd engine's, on one batch of the "
                  f"embedded model, label and sample-weight paths both on, plain SGD virtual step (autograd "
                  f"meta-gradient norm {agree['autograd_norm']:.3g}):", ""]
        lines += [f"- {k}: {val:.6f}" for k, val in agree.items() if k != "autograd_norm"]
    lines += ["", f"Default engine: `{results['default_engine']}` (the cheapest meta step among the engines whose "
              "answer matches autograd to cosine >= 0.999).", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench_out"))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--reuse", action="store_true", help="reuse variants already measured into --out")
    args = ap.parse_args()
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "variants": {}}
    results["agreement"] = engine_agreement()
    print("engine agreement:", results["agreement"], flush=True)
    os.makedirs(args.out, exist_ok=True)
    for name in args.variants:
        saved = os.path.join(args.out, name.replace("/", "_") + ".json")
        if args.reuse and os.path.exists(saved):  # a variant measured by an interrupted earlier call
            results["variants"][name] = json.load(open(saved))
        else:
            results["variants"][name] = summarise(
                run_variant(name, VARIANTS[name], args.iterations, args.out, False),
                run_variant(name, VARIANTS[name], args.iterations, args.out, True))
            json.dump(results["variants"][name], open(saved, "w"))
        print(name, {k: round(x, 2) for k, x in results["variants"][name].items()}, flush=True)
    ok = [n for n in results["variants"] if n != "static" and
          results["agreement"].get(n.split("/", 1)[1], 0.0) >= 0.999]
    results["default_engine"] = min(ok, key=lambda n: results["variants"][n]["meta_total_s"]) if ok else "n/a"
    with open(os.path.join(ROOT, "experiments", "benchmark", "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    write_markdown(results, os.path.join(ROOT, "BENCHMARKS.md"))
    print(open(os.path.join(ROOT, "BENCHMARKS.md")).read())


if __name__ == "__main__":
    main()
