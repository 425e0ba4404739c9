"""Issue 24's check on the embedded policy: does an exported folder answer as meal does?

For one finished run (default: the 5-seed test comparison's Meal seed 0, SmolLM2-135M in bf16 with
preference-aware LoRA) and preferences PREFS, ``meal-export`` writes the merged folder and the peft
adapter; plain transformers (merged) and plain peft over the GGUF base (adapter) then answer PROMPTS
validation prompts greedily, prompt by prompt (batch 1, the prompt built from meal_prompt.json as the
model card says), and each answer is compared with meal's own greedy answer (``meal-generate
greedy=true``). Writes compare.json and README.md into --out.

    python experiments/export_check/check.py --run runs/meta_learner_test/meal-s0 --out docs/results/export_check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch

from meal.run_folder import read_run
from meal.export import base_model_ref, export_run
from meal.generate import Ask, answer
from meal.harness import load_task_data
from meal.compare import experiment_meta, write_results
from meal.run import eval_texts


def plain_answers(folder: str, prompts: list[str], max_new_tokens: int, base: tuple[str, str | None] | None) -> list[str]:
    """Greedy answers of an exported folder with transformers (and peft for an adapter) alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if base is None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    else:
        from peft import PeftModel

        name, gguf = base
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(name, gguf_file=gguf,
                                                                               dtype=torch.bfloat16), folder)
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
    prompts = eval_texts(cfg, load_task_data(cfg).split("validation"), args.prompts)
    max_new = int(cfg.task.max_new_tokens)
    base = base_model_ref(cfg.policy)
    rows = []
    for w in json.loads(args.prefs):
        meal = [r["response"] for r in answer(args.run, Ask(prompts, [w], greedy=True, batch_size=1))]
        for fmt in ("merged", "adapter"):
            folder = os.path.join(args.work, f"{fmt}-{w[0]:.2f}")
            shutil.rmtree(folder, ignore_errors=True)
            export_run(args.run, w, folder, fmt=fmt)
            plain = plain_answers(folder, prompts, max_new, None if fmt == "merged" else base)
            same = [a == b for a, b in zip(plain, meal)]
            rows.append({"preference": w, "format": fmt, "prompts": len(prompts), "identical": sum(same),
                         "pairs": [{"prompt": q, "meal": m, "exported": e} for q, m, e in zip(prompts, meal, plain)]})
            print(f"w={w} {fmt}: {sum(same)} of {len(same)} greedy answers identical to meal's")
    result = experiment_meta(experiment="export check on the embedded policy (issue 24)",
                             wall_seconds=round(time.time() - start), run=args.run,
                             policy=f"{base[0]} {base[1] or ''} ({cfg.policy.dtype})",
                             command=f"python experiments/export_check/check.py --run {args.run} --prefs "
                                     f"'{args.prefs}' --prompts {args.prompts} --out {args.out}", rows=rows)
    lines = [f"# Does an exported folder answer as meal does? ({result['date']})", "",
             f"Run `{args.run}` ({result['policy']}), {len(prompts)} validation prompts, greedy, {max_new} new "
             f"tokens at most, batch 1. merged: `AutoModelForCausalLM.from_pretrained(DIR)`; adapter: "
             f"`PeftModel.from_pretrained(base, DIR)` over the GGUF base; both prompted from meal_prompt.json.", "",
             "| preference | format | greedy answers identical to meal's |", "|---|---|---|"]
    lines += [f"| {r['preference']} | {r['format']} | {r['identical']} of {r['prompts']} |" for r in rows]
    lines += ["", "Every pair of answers is in compare.json.", ""]
    write_results(args.out, result, lines)


if __name__ == "__main__":
    main()
