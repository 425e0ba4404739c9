"""Per-phase cost against the machine's limit (issue 21): where the demo's time goes, and how far each
phase is from what the hardware can do.

One process, the demo's configuration (embedded SmolLM2-135M-Instruct, preference-aware LoRA, the policy
in its ``auto`` dtype, B = 8 prompts x N = 4 samples, 48 new tokens). First the machine's limits, at the
policy's dtype: a matmul of the policy's shapes (the MLP's up projection, 576 -> 1536, at the training
shapes' rows and at the decode step's rows) and the memory bandwidth (a large copy). Then each phase is run
through the library functions the training loop calls, at the demo's shapes, once to warm up, ``--repeat``
times timed, and once under ``torch.utils.flop_counter.FlopCounterMode`` (matmul and attention FLOPs;
that pass is not timed):

- ``generate``: 32 rows sampled at once with one seed for the call (pool sampling: 12 such calls)
- ``online_generate``: the online loop's rollout of those 32 rows, each response drawn with its own seed
  (``trainer.seeding=row``: one generator a row, Gumbel-max over the vocabulary; one call an iteration). Before
  2026-12-03 the online loop drew from the process's stream, the ``generate`` phase's code path
- ``score``: the rewards of those 32 responses
- ``sft_step``: one conditioning-stage step (its batch of labelled corpus rows)
- ``inner_step``, ``meta_step``: Meal's virtual step and meta step (the learner's own ``step``, default engine)
- ``real_step``: the policy's AdamW step on the kept responses plus the replayed stage rows
- ``evaluate``: one grid preference of the final evaluation (the evaluation protocol's sampling, 24 prompts)

For each phase: seconds, tokens (prompt + response tokens the policy reads), GFLOP, GFLOP/s and the share of
the matmul peak; for the generating phases also the weight bytes read per second (every decode step reads
all weights once) and the share of the copy bandwidth. Writes ``experiments/benchmark/phases.json`` and the
table into BENCHMARKS.md (section "Per phase against the machine's limit"); with ``--before`` (the JSON of
an earlier run on the same machine, e.g. of an earlier commit) the table shows each phase's seconds then
and now.

    python experiments/benchmark/phases.py [--repeat 2] [--overrides policy.dtype=float32] [--before old.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECTION = "## Per phase against the machine's limit"
BEFORE_ALIAS = {"online_generate": "generate"}  # a run before 2026-12-03 has no row-seeded online phase


def matmul_peak(dtype: torch.dtype, rows: int, k: int = 576, n: int = 1536, seconds: float = 2.0) -> float:
    """FLOP/s of ``(rows, k) @ (k, n)`` at ``dtype``, the best of repeated timed runs of at least ``seconds``."""
    a, b = torch.randn(rows, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(10):
        a @ b
    best, reps = 0.0, 1
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        tic = time.perf_counter()
        for _ in range(reps):
            a @ b
        dt = time.perf_counter() - tic
        best = max(best, 2 * rows * k * n * reps / dt)
        reps = min(reps * 2, 256) if dt < 0.05 else reps
    return best


def copy_bandwidth(megabytes: int = 512, reps: int = 5) -> float:
    """Bytes/s of a large ``copy_`` (read + write), the best of ``reps``."""
    a = torch.ones(megabytes * 2 ** 20 // 4)
    b = torch.empty_like(a)
    best = 0.0
    for _ in range(reps + 1):
        tic = time.perf_counter()
        b.copy_(a)
        best = max(best, 2 * a.numel() * 4 / (time.perf_counter() - tic))
    return best


class Counter:
    """Forward passes of the policy (each decode step of ``generate`` is one and reads every weight once)."""

    def __init__(self, model):
        self.calls = 0
        model.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def measure(name: str, fn, repeat: int, calls: Counter, weight_bytes: int) -> dict:
    """Warm-up, ``repeat`` timed runs (mean seconds), one FLOP-counted run. ``fn`` returns the tokens it read."""
    fn()
    seconds, tokens, forwards = [], 0, 0
    for _ in range(repeat):
        before = calls.calls
        tic = time.perf_counter()
        tokens = fn()
        seconds.append(time.perf_counter() - tic)
        forwards = calls.calls - before
    with FlopCounterMode(display=False) as fc:
        fn()
    out = {"phase": name, "seconds": statistics.mean(seconds), "tokens": int(tokens),
           "flops": float(fc.get_total_flops()), "forwards": forwards}
    out["flops_per_s"] = out["flops"] / out["seconds"]
    if name in ("generate", "online_generate", "evaluate"):
        out["weight_bytes_per_s"] = forwards * weight_bytes / out["seconds"]
    print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--overrides", nargs="*", default=[], help="more Hydra overrides of experiment=demo")
    ap.add_argument("--json", default=os.path.join(ROOT, "experiments", "benchmark", "phases.json"))
    ap.add_argument("--markdown", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--before", default=None, help="phases JSON of an earlier run on this machine: a before column")
    ap.add_argument("--before-commit", default="an earlier commit", help="the commit that --before's run measured")
    args = ap.parse_args()
    from hydra import compose, initialize_config_dir

    from meal.cli.compare import experiment_meta
    from meal.config import register_configs
    from meal.harness.conditioning import achieved_labels
    from meal.harness.distributed import AdamWStep, Dist
    from meal.harness.preflight import load_task_data
    from meal.harness.profiling import PhaseMeter
    from meal.harness.settings import generation_settings
    from meal.methods import typed_config
    from meal.methods.bilevel import dynamic_preference
    from meal.methods.meal import concat_batches, keep_best, meta_settings, net_shape
    from meal.methods.meta_learner import IterationBatch, PolicyHandle, build_learner, labelled_batch
    from meal.policy.embeddings import embed_prompts
    from meal.policy.losses import build_batch, policy_step
    from meal.policy.model import load_policy, trainable_parameters
    from meal.policy.rollout import ConditionedPolicy, Conditioner, OnlineSampling, Queries, Scoring, rollout
    from meal.policy.sampling import degenerate_mask, generate
    from meal.rewards import RewardNormalizer, RewardSet

    register_configs()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = typed_config(compose(config_name="config", overrides=["experiment=demo", *args.overrides]))
    t, c, m = cfg.trainer, cfg.conditioning, cfg.method
    k = len(cfg.task.objectives)
    torch.manual_seed(0)
    model, tok = load_policy(cfg.policy, k)
    dtype = next(model.parameters()).dtype
    params = trainable_parameters(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    calls = Counter(model)
    limits = {"dtype": str(dtype).removeprefix("torch."), "parameters": sum(p.numel() for p in model.parameters()),
              "matmul_train_flops_per_s": matmul_peak(dtype, t.micro_batch_size * 128),
              "matmul_decode_flops_per_s": matmul_peak(dtype, t.batch_size * t.n_samples),
              "copy_bytes_per_s": copy_bandwidth()}
    print("limits", limits, flush=True)

    cond = Conditioner(cfg.task.template, list(cfg.task.objectives), tok)
    policy = ConditionedPolicy(model, cond)
    rewards = RewardSet.from_config(dict(cfg.rewards), list(cfg.task.objectives))
    data = load_task_data(cfg.task)  # the task's prompts, validation held out as in a run
    train = [e.text for e in data.train]
    texts = train[:t.batch_size]
    settings, eval_settings = generation_settings(cfg), generation_settings(cfg, eval_protocol=True)
    w_star = torch.distributions.Dirichlet(torch.ones(k)).sample((t.batch_size,))
    optimizer = AdamWStep(params, t.lr, t.weight_decay, t.max_grad_norm, Dist())

    def prompt_tokens(prompts, repeats=1) -> int:
        return repeats * sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)

    ro_box = {}

    def gen_phase() -> int:
        ro = rollout(policy, Queries(texts, w_star, t.n_samples, seed=0), settings, Scoring(rewards))
        ro_box["ro"] = ro
        return prompt_tokens(cond(texts, w_star), t.n_samples) + ro.num_tokens

    results = [measure("generate", gen_phase, args.repeat, calls, weight_bytes)]
    ro = ro_box["ro"]
    online = OnlineSampling.build(settings, t.seeding, t.seed)  # as the recipe's loop samples

    def online_phase() -> int:
        got = rollout(policy, online.queries(texts, w_star, t.n_samples, 0), online.settings, Scoring(rewards))
        return prompt_tokens(cond(texts, w_star), t.n_samples) + got.num_tokens

    results.append(measure("online_generate", online_phase, args.repeat, calls, weight_bytes))
    responses = [r for row in ro.texts for r in row]
    scored = [x for x in texts for _ in range(t.n_samples)]
    scored_tokens = prompt_tokens(scored) + ro.num_tokens  # what the rewards read, in the policy's tokens
    results.append(measure("score", lambda: (rewards.score(scored, responses), scored_tokens)[1], args.repeat, calls,
                           weight_bytes))
    normalizer = RewardNormalizer.fit(ro.raw.view(-1, k), list(cfg.task.objectives))
    ro.rewards = normalizer(ro.raw)

    # the stage's step: c.batch_size labelled rows (responses of the pool, labels as the stage draws them)
    rows, labels = achieved_labels(ro.rewards.view(-1, k), [i // t.n_samples for i in range(len(responses))], c.label,
                                   np.random.default_rng(0), c.tau, c.labels_per_group)
    pick = rows[:c.batch_size].tolist()
    sft = build_batch(tok, cond([scored[i] for i in pick], labels[:c.batch_size]), [responses[i] for i in pick],
                      None, t.max_prompt_tokens, prefs=labels[:c.batch_size])
    results.append(measure("sft_step", lambda: (policy_step(model, optimizer, sft, torch.ones(len(sft)),
                                                            c.micro_batch_size), int(sft.attention_mask.sum()))[1],
                           args.repeat, calls, weight_bytes))

    # Meal's steps 2-9 through its learner, as the recipe calls them
    embeddings = embed_prompts(m.weight_net.embedding, model, tok, train) if m.lam < 1 else None
    learner = build_learner(meta_settings(cfg), k, embeddings, net_shape(cfg), t.seed + 1)
    handle = PolicyHandle(model, params, tok, cond, optimizer, t.max_prompt_tokens)
    idx = list(range(t.batch_size))
    learner.begin(0, len(idx))
    w_tilde = dynamic_preference(w_star, learner.propose(idx, w_star), m.lam)
    valid = ~degenerate_mask(ro.texts, ro.finished)
    kept = keep_best(ro, w_tilde, valid, t.top_m)
    batch_it = IterationBatch(idx, texts, w_star, kept, ro.texts, ro.finished, ro.rewards, valid)
    meter = PhaseMeter(None)
    meta_tokens = int(labelled_batch(handle, texts, ro.texts, ro.finished, kept, w_tilde[kept.src])
                      .attention_mask.sum())

    def meta_phase() -> int:
        learner.step(batch_it, handle, Dist(), meter)
        return meta_tokens

    if learner.learns:
        both = measure("inner_step + meta_step", meta_phase, args.repeat, calls, weight_bytes)
        split = meter.pop()  # the meter's own split of the timed runs (and of the others, in the same proportion)
        total = split["time/inner_step"] + split["time/meta_step"]
        for part in ("inner_step", "meta_step"):
            share = split[f"time/{part}"] / total
            results.append({**both, "phase": part, "seconds": both["seconds"] * share,
                            "flops": None, "flops_per_s": None, "of_pair": share})
        results.append(both)

    # step 10: the kept responses and t.replay replayed stage rows (here: more of the generated rows)
    real = labelled_batch(handle, texts, ro.texts, ro.finished, kept, w_tilde[kept.src])
    extra = build_batch(tok, cond(scored[:t.replay], labels[:t.replay]), responses[:t.replay], None,
                        t.max_prompt_tokens, prefs=labels[:t.replay]) if t.replay else None
    real = concat_batches(real, extra, tok.pad_token_id) if extra is not None else real
    results.append(measure("real_step", lambda: (policy_step(model, optimizer, real, torch.ones(len(real)),
                                                             t.micro_batch_size), int(real.attention_mask.sum()))[1],
                           args.repeat, calls, weight_bytes))

    eval_texts = [e.text for e in data.split("validation")][:t.final_eval_prompts]
    w_eval = torch.full((len(eval_texts), k), 1.0 / k)  # one grid preference (the middle one for K = 2)

    def eval_phase() -> int:
        gen = generate(model, tok, cond(eval_texts, w_eval), eval_settings, generator_seed=0, prefs=w_eval)
        return prompt_tokens(cond(eval_texts, w_eval)) + gen.num_tokens

    results.append(measure("evaluate", eval_phase, args.repeat, calls, weight_bytes))

    for r in results:
        if r["flops"] is None:  # the meter's split of the pair: its FLOPs are the pair's
            continue
        r["share_of_matmul_peak"] = r["flops_per_s"] / limits["matmul_train_flops_per_s"]
        if "weight_bytes_per_s" in r:
            r["share_of_bandwidth"] = r["weight_bytes_per_s"] / limits["copy_bytes_per_s"]
    out = experiment_meta(limits=limits, phases=results, config="experiment=demo " + " ".join(args.overrides),
                          repeat=args.repeat, command="python experiments/benchmark/phases.py" + (f" --overrides {' '.join(args.overrides)}"
                                                                  if args.overrides else ""))
    if args.before:
        before = json.load(open(args.before))
        out["before"] = {k: before.get(k) for k in ("date", "machine", "command", "limits")}
        out["before"]["commit"] = args.before_commit
        seconds = {r["phase"]: r["seconds"] for r in before["phases"]}
        for r in results:  # the online loop drew from the process's stream then: the generate phase's path
            r["seconds_before"] = seconds.get(r["phase"], seconds.get(BEFORE_ALIAS.get(r["phase"])))
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    write_section(out, args.markdown)
    print(open(args.markdown).read())


def write_section(out: dict, path: str) -> None:
    """Replace (or append) BENCHMARKS.md's per-phase section."""
    lim = out["limits"]
    lines = [SECTION, "",
             f"Measured by `{out['command']}` (`make bench`) on {out['date']} on {out['machine']}; the demo's "
             f"configuration, policy in {lim['dtype']} ({lim['parameters'] / 1e6:.0f}M parameters), each phase at "
             f"the demo's shapes through the functions the training loop calls, mean of {out['repeat']} timed runs "
             f"after a warm-up; FLOPs counted by `FlopCounterMode` (matmuls and attention) in a separate run.", "",
             f"Machine limits at {lim['dtype']}: matmul (576 -> 1536) {lim['matmul_train_flops_per_s'] / 1e9:.1f} "
             f"GFLOP/s at the training steps' rows, {lim['matmul_decode_flops_per_s'] / 1e9:.1f} GFLOP/s at a decode "
             f"step's 32 rows; copy bandwidth {lim['copy_bytes_per_s'] / 1e9:.1f} GB/s.", "",
             "| phase | seconds | tokens read (policy's tokenizer) | GFLOP | GFLOP/s | share of matmul peak | weights read GB/s | share of "
             "bandwidth |", "|---|---|---|---|---|---|---|---|"]
    before = out.get("before")
    if before:
        then = before["limits"]["matmul_train_flops_per_s"] / 1e9
        note = (f"The before column: `{before['command']}` at {before['commit']}, run on {before['date']} on the same "
                f"machine at the same dtype (matmul {then:.1f} GFLOP/s then). Its online loop drew from the process's "
                f"stream through the `generate` phase's code path: that is its `online_generate` time.")
        lines[4:4] = [note, ""]
        lines[-2] = lines[-2].replace("| seconds |", "| seconds before | seconds |")
        lines[-1] = "|---" + lines[-1]

    def secs(r) -> str:
        if not before:
            return f"{r['seconds']:.2f}"
        b = r.get("seconds_before")
        return f"{b:.2f} | {r['seconds']:.2f}" if b is not None else f" | {r['seconds']:.2f}"

    for r in out["phases"]:
        if "of_pair" in r:
            lines.append(f"| {r['phase']} | {secs(r)} | | | | | | |")
            continue
        bw = (f"{r['weight_bytes_per_s'] / 1e9:.1f} | {r['share_of_bandwidth']:.0%}" if "weight_bytes_per_s" in r
              else " | ")
        lines.append(f"| {r['phase']} | {secs(r)} | {r['tokens']} | {r['flops'] / 1e9:.1f} | "
                     f"{r['flops_per_s'] / 1e9:.1f} | {r['share_of_matmul_peak']:.0%} | {bw} |")
    lines += ["", "The demo pays: pool sampling 12 `generate` + `score` calls, then `conditioning.steps` (150) "
              "`sft_step`s; 12 iterations of `online_generate`, `score`, `inner_step + meta_step` and `real_step`; "
              "the final evaluation 11 `evaluate` calls (each with scoring).", ""]
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if SECTION in text:
        text = re.sub(re.escape(SECTION) + r".*?(?=\n## |\Z)", "\n".join(lines).rstrip() + "\n", text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines)
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
