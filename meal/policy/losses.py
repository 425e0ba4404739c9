"""The SFT loss on kept responses: token-mean NLL on the response tokens only (method.md step 6).

:func:`build_batch` tokenises ``prompt + response (+ eos)`` and masks the prompt and the padding
with -100, so that :func:`per_example_nll` averages over exactly the response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch.func import functional_call

from meal.policy.preference_lora import preference_weights

IGNORE = -100


@dataclass
class SFTBatch:
    """Right-padded token ids (B, T), attention mask (B, T) and labels (B, T) with -100 off-response;
    ``prefs`` (B, K): the preference each prompt was written with (read by preference-aware LoRA)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    prefs: torch.Tensor | None = None

    def to(self, device) -> "SFTBatch":
        return SFTBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                        None if self.prefs is None else self.prefs.to(device))

    def slice(self, idx) -> "SFTBatch":
        return SFTBatch(self.input_ids[idx], self.attention_mask[idx], self.labels[idx],
                        None if self.prefs is None else self.prefs[idx])

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def build_batch(tokenizer, prompts: Sequence[str], responses: Sequence[str], finished: Sequence[bool] | None = None,
                max_prompt_tokens: int = 512, prefs: torch.Tensor | None = None) -> SFTBatch:
    """Tokenise each (prompt, response) pair; eos closes a response that finished with eos.

    The prompt is tokenised on its own (it ends with the generation prompt), the response after
    it, so the boundary is exact. Prompts longer than ``max_prompt_tokens`` keep their last tokens.
    """
    finished = [True] * len(prompts) if finished is None else finished
    rows, labels = [], []
    for prompt, response, done in zip(prompts, responses, finished):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        if done:
            r = r + [tokenizer.eos_token_id]
        if not r:  # an empty unfinished response: train on eos rather than on nothing
            r = [tokenizer.eos_token_id]
        rows.append(p + r)
        labels.append([IGNORE] * len(p) + r)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    lab = torch.tensor([row + [IGNORE] * (width - len(row)) for row in labels])
    return SFTBatch(ids, mask, lab, None if prefs is None else torch.as_tensor(prefs, dtype=torch.float32))


def with_tied_aliases(model: torch.nn.Module, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``params`` plus every other name under which a module holds the same parameter.

    Tied weights (a language model's ``lm_head.weight`` and ``embed_tokens.weight``) are one tensor
    under two names; ``named_parameters()`` lists only one. Mapping both names to the replacement
    makes ``functional_call`` use it everywhere: forward, double backward and forward-mode alike.
    """
    out = dict(params)
    canonical = {id(p): n for n, p in model.named_parameters() if n in params}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name not in out and id(p) in canonical:
            out[name] = params[canonical[id(p)]]
    return out


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs: the LM head then
    runs on the last positions only; the prompt's logits, most of a batch, are never computed)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def per_example_nll(model: torch.nn.Module, batch: SFTBatch,
                    params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Token-mean NLL of each example's response tokens: (B,).

    With ``params`` the model is evaluated at those (trainable) parameters through
    ``torch.func.functional_call``; the other parameters and buffers are the module's own.
    """
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    width = batch.input_ids.shape[1]
    first = int((batch.labels != IGNORE).to(torch.int8).argmax(1).min()) if (batch.labels != IGNORE).any() else 1
    keep = width - max(first, 1) + 1  # logits only from the position before the earliest response token on
    if accepts_logits_to_keep(model):
        # the kept positions as indices, not a count: the LM head then reads a contiguous copy of their hidden
        # states, one matrix product, where a count's slice is a strided view that autograd multiplies as a batch
        # of products with the head's weight expanded per row (2-4x slower on CPU; BENCHMARKS.md, "The loss head")
        kwargs["logits_to_keep"] = torch.arange(width - keep, width, device=batch.input_ids.device)
    with preference_weights(model, batch.prefs):
        if params is None:
            out = model(**kwargs)
        else:
            out = functional_call(model, with_tied_aliases(model, params), args=(), kwargs=kwargs, strict=False,
                                  tie_weights=False)
    logits = out.logits  # (B, kept, V): T, or `keep` where the model computed only the last positions' logits
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()  # the softmax in at least fp32
    b, kept, vocab = logits.shape
    # position t predicts token t+1; the last kept position predicts nothing (its target IGNORE)
    targets = torch.nn.functional.pad(batch.labels[:, width - kept + 1:], (0, 1), value=IGNORE)  # (B, kept)
    # the softmax over each position's contiguous row of V logits: faster than over the V axis of (B, V, kept), and
    # closer to float64 (1.9e-5 against 2.9e-4 at most on the demo policy's float32 logits)
    tok_nll = torch.nn.functional.cross_entropy(logits.reshape(b * kept, vocab), targets.clamp_min(0).reshape(-1),
                                                reduction="none").view(b, kept)
    mask = (targets != IGNORE).to(tok_nll.dtype)
    return (tok_nll * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def policy_step(model, optimizer, batch, weights, micro_batch_size: int,
                dist=None, global_rows: int | None = None) -> tuple[float, float]:
    """Step 10: one AdamW step on L_in = mean_i c_i l_i (weights c detached), micro-batched, clipped.

    ``optimizer`` is an engine of ``meal.harness.distributed`` (plain AdamW with gradients averaged over
    data-parallel ranks, or DeepSpeed ZeRO). Returns (weighted loss, gradient norm before clipping).

    ``global_rows``: the whole batch's row count over all processes, for batches whose shares differ
    in size between processes (RiC keeps what passes its filter). Each process's loss is then its rows'
    sum divided by ``global_rows / world``, so the averaged gradient is the mean over the whole batch, as
    one process takes it; a process with no row (``batch`` None) still joins the average. Without it
    each share is averaged on its own (equal shares: the same).
    """
    device = next(model.parameters()).device
    optimizer.zero_grad()
    n = 0 if batch is None else len(batch)
    world = 1 if dist is None else dist.world
    denom = n if global_rows is None else global_rows / world
    total = 0.0
    starts = range(0, n, micro_batch_size)
    for s in starts:
        part = batch.slice(slice(s, s + micro_batch_size)).to(device)
        loss = (weights[s:s + micro_batch_size].to(device) * per_example_nll(model, part)).sum() / denom
        optimizer.backward(loss, last=s == starts[-1])
        total += loss.item()
    if dist is not None:
        total = dist.mean(total)
    return total, optimizer.step()
