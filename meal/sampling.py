"""Sampling responses and rejection sampling (method.md step 4).

:func:`generate` samples from the policy in batches with no gradient; :func:`select_best` keeps,
for each prompt, the top-m of its N responses by the scalarised score ``s_ij = w_i . R_ij``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class GenerationSettings:
    """How responses are sampled (the evaluation protocol uses top_p 0.9, top_k 0, temperature 1)."""

    max_new_tokens: int = 48
    top_p: float = 0.9
    top_k: int = 0
    temperature: float = 1.0
    batch_size: int = 32
    max_prompt_tokens: int = 512
    sampler: object = None  # a callable like generate() (e.g. meal.vllm_backend.VLLMSampler); None: generate()


@dataclass
class Generation:
    """Sampled responses: ``texts[b]`` for ``prompts[b]``; ``finished[b]`` is False when cut at the budget."""

    texts: list[str]
    finished: list[bool]
    num_tokens: int


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], settings: GenerationSettings,
             generator_seed: int | None = None) -> Generation:
    """Sample one response per prompt string (repeat a prompt N times for N samples), with Hugging Face.

    Prompts are left-padded in batches of ``settings.batch_size``. With ``generator_seed`` the call
    runs under its own seed inside ``fork_rng``: it returns the same responses every time
    (evaluation) and leaves the caller's RNG stream untouched (training is not perturbed by
    periodic evaluations).
    """
    if generator_seed is not None:
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(generator_seed)
            return generate(model, tokenizer, prompts, settings)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    texts, finished, n_tokens = [], [], 0
    for i in range(0, len(prompts), settings.batch_size):
        chunk = list(prompts[i:i + settings.batch_size])
        enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                        max_length=settings.max_prompt_tokens, add_special_tokens=False).to(device)
        out = model.generate(**enc, do_sample=True, top_p=settings.top_p, top_k=settings.top_k,
                             temperature=settings.temperature, max_new_tokens=settings.max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        new = out[:, enc["input_ids"].shape[1]:]  # (b, T_new)
        for row in new:
            hit = (row == eos).nonzero()
            end = int(hit[0]) if len(hit) else len(row)
            n_tokens += end
            finished.append(bool(len(hit)))
            texts.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    model.train(was_training)
    return Generation(texts, finished, n_tokens)


def select_best(scores: torch.Tensor, top_m: int = 1) -> torch.Tensor:
    """Indices (B, m) of the top-m responses per prompt of a (B, N) score matrix (best first).

    >>> select_best(torch.tensor([[0.1, 0.9, 0.5], [2.0, -1.0, 3.0]])).tolist()
    [[1], [2]]
    """
    return scores.topk(top_m, dim=1).indices


def scalarise(prefs: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """s_ij = w_i . R_ij: prefs (B, K), rewards (B, N, K) -> (B, N)."""
    return torch.einsum("bk,bnk->bn", prefs, rewards)
