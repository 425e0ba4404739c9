"""The prepared GPU check (``experiments/gpu/check.sh``): what one call on the lent GPU machine measures.

Each part is guarded: a part that fails is recorded (its error and the end of its traceback) and the next
part still runs; ``check.json`` is rewritten after every part, so a call cut short keeps what was measured.

- ``a_demo``: the demo's pipeline end to end on the device through meal's own recipe (see
  :func:`part_demo` for what stands in for the weights and rewards that do not travel).
- ``b_7b_shape``: a model of Llama-2-7b's shape with random weights (no download: the config is written
  here), bf16, meal's preference-aware LoRA r 64 on the paper's targets (q, k, v, o), with gradient
  checkpointing off and on. At the paper configs' batch sizes (32 prompts x 4 samples, micro-batches of 8):
  generate (a fixed token count: random weights never emit eos), the virtual step (``inner_step``) and
  the meta step (``meta_step``) with each engine, through :func:`meal.methods.bilevel.meta_gradient` on
  16 + 16 kept rows, and the real step (:func:`meal.policy.losses.policy_step`, AdamW) on 32. Seconds and
  peak memory above the resident model for each; whether the meta step fits, and its cost as a multiple
  of the real step. (The meta step itself always runs without checkpointing: meal turns it off there,
  :func:`meal.policy.model.checkpointing_off`; the real step checkpoints when the config asks.)
- ``c_sampling``: meal's sampling loop (:func:`meal.policy.sampling.generate`: left-padded batches, its
  degenerate-response bookkeeping, decoding) against plain ``model.generate`` on the same token ids, in
  tokens per second, on the embedded default's shape (SmolLM2-135M) with random weights.

``--dry-run`` runs the same code on the CPU with tiny shapes (a test runs it, so that it cannot rot).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

# the paper's policy and the embedded default, as shapes (random weights: nothing is downloaded)
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    tie_word_embeddings=True)
TINY = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


@dataclass(frozen=True)
class Sizes:
    """One check's batch: ``prompts`` x ``samples`` rows of ``prompt_tokens`` + ``new_tokens``, the real step
    in micro-batches of ``micro``, LoRA rank ``r`` (alpha 2r) on ``targets``; ``gen_batch`` rows a generate
    call."""

    prompts: int
    samples: int
    prompt_tokens: int
    new_tokens: int
    micro: int
    r: int
    gen_batch: int
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


PAPER = Sizes(prompts=32, samples=4, prompt_tokens=256, new_tokens=48, micro=8, r=64, gen_batch=128)
DRY = Sizes(prompts=4, samples=2, prompt_tokens=12, new_tokens=6, micro=2, r=4, gen_batch=8)
ENGINES = {"autograd": dict(engine="autograd"), "directional-per_example": dict(engine="directional"),
           "directional-jvp": dict(engine="directional", mode="jvp"),
           "directional-fd": dict(engine="directional", mode="fd")}


def run_part(results: dict, name: str, fn: Callable[[], dict], path: str) -> None:
    """Run one part; record its result or its error, then rewrite ``path`` (check.json)."""
    tic = time.perf_counter()
    try:
        results["parts"][name] = {"ok": True, **fn()}
    except Exception as e:  # noqa: BLE001 - any failure on the device is a finding: record it, go on
        results["parts"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
                                  "traceback": traceback.format_exc()[-4000:]}
    results["parts"][name]["seconds"] = round(time.perf_counter() - tic, 2)
    print(f"[check] {name}: {'ok' if results['parts'][name]['ok'] else 'FAILED'} "
          f"({results['parts'][name]['seconds']} s)", flush=True)
    if not results["parts"][name]["ok"]:
        print(results["parts"][name]["traceback"], flush=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=str)


def random_llama(shape: dict, dtype: torch.dtype, device: torch.device):
    """A LlamaForCausalLM of ``shape`` with random weights, built on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.pad_token_id = 0
    return model


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, peak MiB above what was allocated before; CUDA only, else nan)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    tic = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - tic
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if cuda else float("nan")
    return out, seconds, peak


def sft_batch(rows: int, s: Sizes, vocab: int, k: int, device: torch.device):
    """``rows`` random (prompt, response) rows: the loss on the last ``new_tokens`` tokens, preferences (rows, K)."""
    from meal.policy.losses import IGNORE, SFTBatch

    g = torch.Generator().manual_seed(rows)
    ids = torch.randint(3, vocab, (rows, s.prompt_tokens + s.new_tokens), generator=g)
    labels = ids.clone()
    labels[:, :s.prompt_tokens] = IGNORE
    prefs = torch.distributions.Dirichlet(torch.ones(k)).sample((rows,))
    return SFTBatch(ids, torch.ones_like(ids), labels, prefs).to(device)


def part_7b_shape(s: Sizes, shape: dict, device: torch.device, dtype: torch.dtype) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from meal.harness.distributed import AdamWStep, Dist
    from meal.harness.profiling import PhaseMeter
    from meal.methods.bilevel import InnerLoss, MetaGradSettings, meta_gradient
    from meal.policy.losses import per_example_nll, policy_step
    from meal.policy.model import trainable_parameters
    from meal.policy.preference_lora import attach_preference_lora, checkpointing_kwargs, preference_weights

    k = 2
    model = random_llama(shape, dtype, device)
    attach_preference_lora(model, k, s.r, 2 * s.r, 0.05, list(s.targets))
    params = trainable_parameters(model)
    with torch.no_grad():  # move B off zero, as after some training: every LoRA factor has a gradient
        for n, p in params.items():
            if "lora_B" in n:
                p.normal_(0, 1e-3)
    out: dict[str, Any] = {"shape": shape, "dtype": str(dtype), "sizes": s.__dict__,
                           "trainable_params": sum(p.numel() for p in params.values()),
                           "model_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20}
    # generate: prompts x samples rows, a fixed number of new tokens, in batches of gen_batch
    rows = s.prompts * s.samples
    ids = torch.randint(3, shape["vocab_size"], (rows, s.prompt_tokens), generator=torch.Generator().manual_seed(1))
    prefs = torch.distributions.Dirichlet(torch.ones(k)).sample((rows,))

    def generate_all():
        n = 0
        for a in range(0, rows, s.gen_batch):
            chunk = ids[a:a + s.gen_batch].to(device)
            with torch.no_grad(), preference_weights(model, prefs[a:a + s.gen_batch].to(device)):
                gen = model.generate(chunk, attention_mask=torch.ones_like(chunk), do_sample=True, top_p=0.9,
                                     min_new_tokens=s.new_tokens, max_new_tokens=s.new_tokens)
            n += gen[:, chunk.shape[1]:].numel()
        return n

    model.eval()
    tokens, sec, peak = timed(device, generate_all)
    out["generate"] = {"rows": rows, "new_tokens": tokens, "seconds": sec, "peak_mib": peak,
                       "tokens_per_s": tokens / sec}
    model.train()
    kept = sft_batch(s.prompts, s, shape["vocab_size"], k, device)  # one kept response per prompt
    half = s.prompts // 2
    inner_b, meta_b = (kept.slice(slice(0, half)), kept.slice(slice(half, s.prompts)))
    phi = [torch.zeros(1, device=device, requires_grad=True)]  # the net's parameters: one scalar on the weights
    inner = InnerLoss(inner_b, lambda: torch.sigmoid(phi[0]).expand(half) * 2, lambda: None)
    for checkpointing in (False, True):
        key = "checkpointing" if checkpointing else "no_checkpointing"
        if checkpointing:  # as load_policy does (the paper's config checkpoints)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs(model))
            model.config.use_cache = False
        else:
            model.gradient_checkpointing_disable()
        res: dict[str, Any] = {}
        out[key] = res
        optimizer = AdamWStep(params, 1e-5, 0.0, 1.0, Dist())
        try:
            _, sec, peak = timed(device, lambda: policy_step(model, optimizer, kept, torch.ones(s.prompts), s.micro))
        except Exception as e:  # noqa: BLE001 - recorded; the engines below are measured against nothing then
            res["real_step"] = {"error": f"{type(e).__name__}: {e}"[:1000]}
            continue
        res["real_step"] = {"rows": s.prompts, "seconds": sec, "peak_mib": peak}
        for name, kw in ENGINES.items():
            meter = PhaseMeter(device)
            # as the Meal recipe: double backward and forward-mode AD are implemented by the math SDPA kernel only
            kernel = sdpa_kernel(SDPBackend.MATH) if kw.get("mode") == "jvp" or kw["engine"] == "autograd" \
                else contextlib.nullcontext()
            try:
                phi[0].grad = None
                with kernel:
                    _, sec, peak = timed(device, lambda: meta_gradient(
                        model, params, inner, lambda p: per_example_nll(model, meta_b, p).mean(), phi,
                        MetaGradSettings(1e-5, micro_batch_size=s.micro, **kw), meter))
                res[name] = {"seconds": sec, "peak_mib": peak, "inner_step_s": meter.seconds.get("inner_step"),
                             "meta_step_s": meter.seconds.get("meta_step"),
                             "x_real_step": sec / res["real_step"]["seconds"],
                             "hypergradient": float(phi[0].grad.norm()) if phi[0].grad is not None else None}
            except torch.cuda.OutOfMemoryError as e:  # the finding: this engine does not fit at this batch
                res[name] = {"fits": False, "error": str(e)[:500]}
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001 - recorded, the next engine still runs
                res[name] = {"error": f"{type(e).__name__}: {e}"[:1000]}
            finally:
                optimizer.zero_grad()
    return out  # the model goes with the frame (part c starts on a free card)


def word_tokenizer(vocab_size: int):
    """A word-level fast tokenizer of ``vocab_size`` entries (``w3`` ... plus pad, bos, eos), built here:
    random weights need no real vocabulary, and nothing is downloaded."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def part_sampling(s: Sizes, shape: dict, device: torch.device, dtype: torch.dtype) -> dict:
    from meal.policy.sampling import GenerationSettings, generate

    model = random_llama(shape, dtype, device).eval()
    tok = word_tokenizer(shape["vocab_size"])
    rows = s.prompts * s.samples
    g = torch.Generator().manual_seed(2)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(3, shape["vocab_size"], (s.prompt_tokens,), generator=g))
               for _ in range(rows)]
    settings = GenerationSettings(max_new_tokens=s.new_tokens, batch_size=s.gen_batch,
                                  max_prompt_tokens=s.prompt_tokens)
    out: dict[str, Any] = {"shape": shape, "rows": rows, "new_tokens": s.new_tokens}
    generate(model, tok, prompts[:s.gen_batch], settings, generator_seed=0)  # warm-up (kernels, allocator)
    gen, sec, peak = timed(device, lambda: generate(model, tok, prompts, settings, generator_seed=0))
    out["meal_generate"] = {"tokens": gen.num_tokens, "seconds": sec, "peak_mib": peak,
                            "tokens_per_s": gen.num_tokens / sec}
    tok.padding_side = "left"

    def plain():
        n = 0
        for a in range(0, rows, s.gen_batch):
            enc = tok(prompts[a:a + s.gen_batch], return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                o = model.generate(**enc, do_sample=True, top_p=0.9, max_new_tokens=s.new_tokens,
                                   pad_token_id=tok.pad_token_id)
            n += int((o[:, enc["input_ids"].shape[1]:] != tok.pad_token_id).sum())
        return n

    tokens, sec, peak = timed(device, plain)
    out["plain_generate"] = {"tokens": tokens, "seconds": sec, "peak_mib": peak, "tokens_per_s": tokens / sec}
    out["meal_over_plain"] = out["meal_generate"]["tokens_per_s"] / out["plain_generate"]["tokens_per_s"]
    return out


CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> {% endif %}")


def part_demo(dry: bool, device: torch.device, dtype: torch.dtype) -> dict:
    """The demo's pipeline on the device, end to end through meal's own recipe (conditioning stage, Meal's
    iterations with the net, checkpoints, the final front): the embedded task's prompts and template, the
    demo's batch (8 prompts x 4 samples, 48 new tokens, LoRA r 8 on q, v, preference-aware) on a random
    model of SmolLM2-135M's shape (the GGUF's 98 MB do not travel) with a word-level tokenizer, scored by
    the embedded rewards that need no model (positive: VADER, concise: brevity; helpful's MiniLM does not
    travel either). Its front says nothing of quality; its per-phase seconds are the demo's work on the
    device, and any error is one meal raises on CUDA."""
    from meal.methods import train

    shape = TINY if dry else SMOLLM2_135M
    work = tempfile.mkdtemp(prefix="meal-gpu-demo-")  # not under $OUT: only check.json and the log come back
    folder = os.path.join(work, "policy")
    random_llama(shape, torch.float32, torch.device("cpu")).save_pretrained(folder)
    tok = word_tokenizer(shape["vocab_size"])
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    run_dir = os.path.join(work, "run")
    cfg = {
        "task": {"name": "assistant_embedded", "data": {"_target_": "meal.tasks.load_embedded", "name": "assistant"},
                 "objectives": ["positive", "concise"], "max_new_tokens": 6 if dry else 48, "hv_ref": [-2.0, -2.0],
                 "template": {"user": "{text}\n\n(Preference weights: {preference}.)", "chat": True},
                 "pool_instructions": ["", "Answer in one short sentence."]},
        "rewards": {"positive": {"_target_": "meal.rewards.embedded.VaderSentiment"},
                    "concise": {"_target_": "meal.rewards.embedded.Brevity", "scale": 10.0, "min_words": 3,
                                "penalty_words": 50}},
        "policy": {"name_or_path": folder, "gguf_file": None, "dtype": str(dtype).replace("torch.", ""),
                   "device": device.type, "lora": {"enabled": True, "preference_aware": True, "r": 8, "alpha": 16,
                                                   "target_modules": ["q_proj", "v_proj"]}},
        "method": {"name": "meal"},
        "conditioning": {"enabled": True, "steps": 2 if dry else 30, "pool_prompts": 4 if dry else 32,
                         "batch_size": 4 if dry else 8, "micro_batch_size": 2 if dry else 8, "cache": None},
        "trainer": {"iterations": 2 if dry else 4, "batch_size": 4 if dry else 8, "n_samples": 2 if dry else 4,
                    "gen_batch_size": 32, "micro_batch_size": 2 if dry else 8, "final_eval_prompts": 2 if dry else 8,
                    "out_dir": run_dir, "stats_cache": None, "save_every": 2, "eval_every": 0, "table_every": 0},
        "logger": {"_target_": "meal.harness.tracking.NullLogger"},
    }
    tic = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - tic
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"train/loss"' in line]
    later = rows[1:] or rows  # the first iteration warms the kernels up
    phases = {k[len("time/"):]: sum(r.get(k, 0.0) for r in later) / len(later)
              for k in sorted({k for r in later for k in r if k.startswith("time/")})}
    memory = {k[len("memory/"):]: max(r.get(k, 0.0) for r in later)
              for k in sorted({k for r in later for k in r if k.startswith("memory/")})}
    stage = json.load(open(os.path.join(run_dir, "conditioning", "stage.json")))
    front = json.load(open(os.path.join(run_dir, "front.json")))
    return {"wall_s": wall, "iteration_phases_s": phases, "iteration_memory_mib": memory,
            "stage_budget": stage.get("budget"), "iterations": len(rows), "run_dir": summary.get("run_dir"),
            "front": {k: front.get(k) for k in ("hypervolume", "spearman", "ranges", "nondominated", "degenerate")},
            "meta_learner": front.get("extra", {}).get("meta_learner")}


def versions() -> dict:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    for name in ("peft", "accelerate", "hydra", "omegaconf"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - what is missing is what the report says
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"), help="folder for check.json")
    ap.add_argument("--dry-run", action="store_true", help="the same parts on the CPU with tiny shapes")
    ap.add_argument("--parts", default="a_demo,b_7b_shape,c_sampling", help="comma-separated parts to run")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    dry = args.dry_run or not torch.cuda.is_available()
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    sizes = DRY if dry else PAPER
    results: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               "dry_run": dry, "versions": versions(), "parts": {}}
    path = os.path.join(args.out, "check.json")
    parts = {"a_demo": lambda: part_demo(dry, device, dtype),
             "b_7b_shape": lambda: part_7b_shape(sizes, TINY if dry else LLAMA2_7B, device, dtype),
             "c_sampling": lambda: part_sampling(sizes, TINY if dry else SMOLLM2_135M, device, dtype)}
    for name in args.parts.split(","):
        run_part(results, name, parts[name], path)
    ok = all(p["ok"] for p in results["parts"].values())
    print(f"[check] wrote {path}: {'all parts ok' if ok else 'some parts failed'}", flush=True)
    return results


if __name__ == "__main__":
    main()
