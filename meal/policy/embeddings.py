"""Frozen prompt embeddings e(x) for the preference-weight-net (method.md step 2).

Computed once per prompt before training and cached (the policy they come from is frozen):

- ``policy``: mean-pooled last hidden state of the frozen base policy (LoRA adapters disabled);
- ``minilm``: the all-MiniLM-L6-v2 sentence encoder.

Both are L2-normalised so the net sees inputs of one scale whatever the policy's width.
"""

from __future__ import annotations

from typing import Sequence

import torch

from meal.policy.preference_lora import base_only


@torch.no_grad()
def policy_embeddings(model, tokenizer, texts: Sequence[str], batch_size: int = 16,
                      max_tokens: int = 512) -> torch.Tensor:
    """(M, H) mean-pooled last hidden states of the base policy, L2-normalised, float32 on CPU.

    The decoder alone runs where the model exposes it (``get_decoder``): its last hidden state is the
    causal LM's ``hidden_states[-1]`` (after the final norm) without the vocabulary projection, thrown
    away here (on SmolLM2 a third of this pass's time in float32: BENCHMARKS.md)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    with base_only(model):
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                            max_length=max_tokens).to(device)
            if decoder is not None:
                hidden = decoder(**enc, use_cache=False).last_hidden_state  # (b, T, H)
            else:
                hidden = model(**enc, output_hidden_states=True, use_cache=False).hidden_states[-1]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(out)


def minilm_embeddings(texts: Sequence[str], device: str = "cpu") -> torch.Tensor:
    """(M, 384) all-MiniLM-L6-v2 sentence embeddings, L2-normalised."""
    from meal.rewards.embedded import SentenceEncoder

    return SentenceEncoder(device=device).encode(texts)


def embed_prompts(kind: str, model, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Embeddings of the task texts by ``kind`` (policy | minilm): (M, D)."""
    if kind == "policy":
        return policy_embeddings(model, tokenizer, texts)
    if kind == "minilm":
        return minilm_embeddings(texts)
    raise ValueError(f"method.weight_net.embedding: unknown embedding {kind!r} (policy | minilm)")
