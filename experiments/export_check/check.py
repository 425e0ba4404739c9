"""Issue 24's check on the embedded policy: does an exported folder answer as meal does?

For one finished run (SmolLM2-135M with preference-aware LoRA, trained in bf16 where the CPU has it) and
preferences PREFS, ``meal-export`` writes the merged folder (in float32, the default, and in the run's dtype)
and the peft adapter; plain transformers (merged) and plain peft over the GGUF base (adapter) then answer
PROMPTS validation prompts greedily, prompt by prompt (batch 1, the prompt built from meal_prompt.json as the
model card says), and each answer is compared with meal's own greedy answer (``meal-generate greedy=true``)
with the policy in the same dtype. Meal's bf16 answers against its float32 ones give the rounding floor.
Also: how much of the update at w a fold stored in bf16 loses. Writes compare.json and README.md into --out.

    python experiments/export_check/check.py --run runs/demo/<run> --out docs/results/export_check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch

from meal.cli.compare import experiment_meta, write_results
from meal.cli.export import Export, base_model_ref, export_run
from meal.cli.generate import Ask, answer
from meal.harness.preflight import load_task_data
from meal.harness.saved_run import read_run
from meal.harness.settings import eval_texts
from meal.policy.model import resolve_dtype


def plain_answers(folder: str, prompts: list[str], max_new_tokens: int, base: tuple[str, str | None] | None,
                  dtype: torch.dtype | str = "auto") -> list[str]:
    """Greedy answers of an exported folder with transformers (and peft over ``base`` for an adapter) alone,
    the model in ``dtype`` (auto: the folder's own)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if base is None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    else:
        from peft import PeftModel

        name, gguf = base
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(name, gguf_file=gguf, dtype=dtype),
                                          folder)
    p = json.load(open(os.path.join(folder, "meal_prompt.json")))
    out = []
    for q in prompts:
        user = p["user"].format(text=q)
        messages = ([{"role": "system", "content": p["system"]}] if p["system"] else []) + [{"role": "user",
                                                                                             "content": user}]
        prompt = (tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) if p["chat"]
                  else user + p["suffix"])
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def fold_loss(run: str, w: list[float], dtype: torch.dtype) -> float:
    """How much of the update at w a fold stored in ``dtype`` loses: ||round(W + D) - W - D|| / ||D|| over every
    adapted layer, W the base weights as meal runs them (in ``dtype``), D the update in float32."""
    from meal.cli.export import _unwrap_preference_lora
    from meal.harness.saved_run import load_run

    _, model, _, _ = load_run(run, dtype=str(dtype).removeprefix("torch."))
    err = norm = 0.0
    for a, b, scale, base in _unwrap_preference_lora(model, w).values():
        weight, update = base.weight.float(), scale * (b @ a)
        err += ((weight + update).to(dtype).float() - weight - update).pow(2).sum().item()
        norm += update.pow(2).sum().item()
    return (err / norm) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/meta_learner_test/meal-s0")
    ap.add_argument("--prefs", default="[[0.1, 0.9], [0.9, 0.1]]")
    ap.add_argument("--prompts", type=int, default=8, help="validation prompts of the run's task")
    ap.add_argument("--work", default="runs/export_check")
    ap.add_argument("--out", default="docs/results/export_check")
    args = ap.parse_args()
    start = time.time()
    cfg, _ = read_run(args.run, "latest")
    prompts = eval_texts(cfg, load_task_data(cfg.task).split("validation"), args.prompts)
    max_new = int(cfg.task.max_new_tokens)
    base = base_model_ref(cfg.policy)
    run_dtype = str(resolve_dtype(cfg.policy.dtype, torch.device("cpu"))).removeprefix("torch.")
    rows, losses = [], {}
    for w in json.loads(args.prefs):
        meal = {d: [r["response"] for r in answer(args.run, Ask(prompts, [w], greedy=True, batch_size=1, dtype=d))]
                for d in dict.fromkeys(["float32", run_dtype])}
        losses[str(w)] = fold_loss(args.run, w, getattr(torch, run_dtype)) if run_dtype != "float32" else 0.0
        answers = {}
        for fmt, dtype in dict.fromkeys([("merged", "float32"), ("merged", run_dtype), ("adapter", "float32")]):
            folder = os.path.join(args.work, f"{fmt}-{dtype}-{w[0]:.2f}")
            shutil.rmtree(folder, ignore_errors=True)
            export_run(args.run, w, folder, Export(fmt=fmt, dtype=dtype))
            if fmt == "merged":
                answers[f"merged {dtype}", dtype] = plain_answers(folder, prompts, max_new, None)
            else:  # the adapter over the base model in each dtype meal ran in
                for d in meal:
                    answers[f"adapter over the {d} base", d] = plain_answers(folder, prompts, max_new, base,
                                                                            getattr(torch, d))
        if run_dtype != "float32":  # the floor: meal against itself in the other dtype
            answers[f"meal {run_dtype} (the run's dtype)", "float32"] = meal[run_dtype]
        for (name, d), plain in answers.items():
            same = [a == b for a, b in zip(plain, meal[d])]
            rows.append({"preference": w, "answers": name, "against": f"meal {d}", "prompts": len(prompts),
                         "identical": sum(same),
                         "pairs": [{"prompt": q, "meal": m, "other": e} for q, m, e in zip(prompts, meal[d], plain)]})
            print(f"w={w} {name} vs meal {d}: {sum(same)} of {len(same)} greedy answers identical")
    result = experiment_meta(experiment="export check on the embedded policy (issue 24)",
                             wall_seconds=round(time.time() - start), run=args.run,
                             policy=f"{base[0]} {base[1] or ''} ({cfg.policy.dtype}: {run_dtype} here)",
                             fold_loss=losses, run_dtype=run_dtype,
                             command=f"python experiments/export_check/check.py --run {args.run} --prefs "
                                     f"'{args.prefs}' --prompts {args.prompts} --out {args.out}", rows=rows)
    lines = [f"# Does an exported folder answer as meal does? ({result['date']})", "",
             f"Run `{args.run}` ({result['policy']}), {len(prompts)} validation prompts, greedy, {max_new} new "
             f"tokens at most, batch 1. Meal's answers: `meal-generate greedy=true` with the policy in "
             f"{' and '.join(dict.fromkeys(['float32', run_dtype]))}. Merged: `meal-export` "
             f"(dtype {' and '.join(dict.fromkeys(['float32', run_dtype]))}) loaded by "
             f"`AutoModelForCausalLM.from_pretrained(DIR)`; adapter: `PeftModel.from_pretrained(base, DIR)` over the "
             f"GGUF base; all prompted from meal_prompt.json.", "",
             "| preference | answers of | against | greedy answers identical |", "|---|---|---|---|"]
    lines += [f"| {r['preference']} | {r['answers']} | {r['against']} | {r['identical']} of {r['prompts']} |"
              for r in rows]
    if run_dtype != "float32":
        lines += ["", f"A fold stored in {run_dtype} loses part of the update at w (relative error "
                  f"||round(W + D) - W - D|| / ||D|| over the adapted layers): "
                  + ", ".join(f"{k}: {v:.2f}" for k, v in losses.items()) + "."]
    lines += ["", "Every pair of answers is in compare.json.", ""]
    write_results(args.out, result, lines)


if __name__ == "__main__":
    main()
