"""Preference-aware LoRA: the preference enters the policy's weights, not only its prompt.

A small policy learns to read ``helpful 0.30, concise 0.70`` in its prompt slowly: on the embedded
default (SmolLM2-135M, 150 SFT steps on a corpus that spans the trade-off) the front's rank
correlations with the preference stayed near 0 whatever the labels, the LoRA targets or the
normalisation (``docs/results/conditioning/``). Following Panacea (preference-dependent singular
values of an SVD-LoRA) and PARM (preference-aware bilinear LoRA), this adapter makes the
preference a coefficient of the weight update. Every adapted linear layer W (out x in) becomes

    h = W x + (alpha / r) * ( B_0 A_0 x  +  sum_k w_k B_k A_k x )            w on the K-simplex

with one shared adapter (A_0, B_0) and one adapter (A_k, B_k) per objective, each of rank r. Each
row of a batch carries its own preference w (B, K), set for the duration of a forward pass or a
``generate`` call by :func:`preference_weights`. The B matrices start at zero, so the untrained
policy is the base model; at w = e_k the update is the shared adapter plus the k-th. The prompt
still carries the preference as text (one template everywhere); the weights make it impossible
to ignore. This is the mixture form of the two anchors: Panacea's singular values w_k are here the
coefficients of K rank-r blocks, with a learned shared block beside them.

Parameters are named ``<layer>.pref_lora_A`` ((K+1, r, in)) and ``<layer>.pref_lora_B``
((K+1, out, r)), kept in float32 (as peft keeps LoRA weights), so checkpoints, the virtual step
(``torch.func.functional_call``), data parallelism and DeepSpeed treat them as any trainable
parameter. vLLM cannot sample from such a policy (refused at config time).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn


@dataclass
class PreferenceState:
    """The preferences of the rows in flight (B, K), shared by every adapted layer of one model."""

    num_objectives: int
    weights: torch.Tensor | None = None
    disabled: bool = False
    layers: list[str] = field(default_factory=list)


class PreferenceLoRALinear(nn.Module):
    """``base(x) + scale * sum_{k=0..K} c_k B_k A_k dropout(x)`` with c = (1, w_1, ..., w_K) per row."""

    def __init__(self, base: nn.Linear, state: PreferenceState, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.state = state
        k1 = state.num_objectives + 1
        a = torch.empty(k1, r, base.in_features)
        for i in range(k1):  # as peft's LoRA: kaiming-uniform A, zero B (the update starts at 0)
            nn.init.kaiming_uniform_(a[i], a=math.sqrt(5))
        self.pref_lora_A = nn.Parameter(a)
        self.pref_lora_B = nn.Parameter(torch.zeros(k1, base.out_features, r))
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:  # code that inspects q_proj.weight (dtype, device) still finds it
        return self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        st = self.state
        if st.disabled:
            return y
        w = st.weights
        if w is None:
            raise RuntimeError("a preference-aware LoRA layer ran without a preference: wrap the call in "
                               "meal.policy.preference_lora.preference_weights(model, prefs)")
        if w.shape[0] not in (1, x.shape[0]):  # one row: the same preference for every row of the batch
            raise RuntimeError(f"preferences for {w.shape[0]} rows, but the batch has {x.shape[0]}")
        a, b = self.pref_lora_A, self.pref_lora_B  # (K+1, r, in), (K+1, out, r)
        k1, r = a.shape[0], a.shape[1]
        coef = torch.cat([torch.ones_like(w[:, :1]), w], dim=1).to(a.dtype)  # (B, K+1)
        coef = coef.view(coef.shape[0], *([1] * (x.dim() - 2)), k1, 1)  # (B, 1.., K+1, 1)
        h = self.dropout(x).to(a.dtype) @ a.reshape(k1 * r, -1).T  # (B, .., (K+1) r): every A at once
        h = (h.unflatten(-1, (k1, r)) * coef).flatten(-2)  # each block scaled by its coefficient
        delta = h @ b.permute(1, 0, 2).reshape(b.shape[1], k1 * r).T  # (B, .., out): sum_k c_k B_k A_k x
        return y + (self.scale * delta).to(y.dtype)


def layer_index(name: str) -> int | None:
    """The decoder layer a module name lies in (``model.layers.12.self_attn.q_proj`` -> 12), else None."""
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("layers", "h", "layer", "blocks") and b.isdigit():
            return int(b)
    return None


def attach_preference_lora(model: nn.Module, num_objectives: int, r: int, alpha: float, dropout: float,
                           target_modules: Sequence[str], layers_from: int = 0) -> PreferenceState:
    """Replace every ``nn.Linear`` whose name ends in one of ``target_modules`` (in the decoder layers
    ``layers_from`` and above) by a :class:`PreferenceLoRALinear`; freeze everything else. Returns the
    model's shared state."""
    state = PreferenceState(num_objectives)
    targets = set(target_modules)
    found = [(name, mod) for name, mod in model.named_modules()
             if name.rsplit(".", 1)[-1] in targets and isinstance(mod, nn.Linear)
             and (layers_from == 0 or (layer_index(name) or 0) >= layers_from)]
    if not found:
        raise ValueError(f"policy.lora.target_modules: no linear layer named {sorted(targets)} in the policy")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, mod in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = PreferenceLoRALinear(mod, state, r, alpha, dropout).to(mod.weight.device)
        setattr(parent, child, layer)
        state.layers.append(name)
    model.meal_preference = state  # a plain attribute (not a module): found by preference_weights
    return state


def has_preference_lora(model: nn.Module) -> bool:
    return getattr(model, "meal_preference", None) is not None


@contextlib.contextmanager
def preference_weights(model: nn.Module, prefs: torch.Tensor | None) -> Iterator[None]:
    """Within the block, the model's preference-aware layers use ``prefs`` (B, K), one row per
    batch row, or (1, K) for every row. A no-op for a model without such layers (the preference is
    then in the text only)."""
    state = getattr(model, "meal_preference", None)
    if state is None:
        yield
        return
    if prefs is None:
        raise ValueError("this policy has preference-aware LoRA layers: every forward pass needs preferences")
    prev = state.weights
    # a float tensor keeps its dtype and its graph (the meta-gradient's label path differentiates through it)
    w = prefs if torch.is_tensor(prefs) and prefs.is_floating_point() else torch.as_tensor(prefs, dtype=torch.float32)
    state.weights = w.to(next(model.parameters()).device)
    try:
        yield
    finally:
        state.weights = prev


def checkpointing_kwargs(model: nn.Module) -> dict:
    """Keyword arguments for ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)``.

    Non-reentrant checkpointing recomputes a layer's forward pass during the backward pass, after the
    :func:`preference_weights` block of the forward pass has ended: a preference-aware layer would find
    no preference then. ``context_fn`` carries the preferences of each checkpointed forward into its
    recomputation (the same tensor, graph included)."""
    state = getattr(model, "meal_preference", None)
    if state is None:
        return {"use_reentrant": False}

    def context_fn():
        weights = state.weights  # the preferences this forward pass runs with

        @contextlib.contextmanager
        def recompute():
            prev = state.weights
            state.weights = weights
            try:
                yield
            finally:
                state.weights = prev

        return contextlib.nullcontext(), recompute()

    return {"use_reentrant": False, "context_fn": context_fn}


def base_only(model: nn.Module):
    """A context in which ``model`` runs as its frozen base: peft's adapters or the preference-aware
    layers off (a plain model: nothing to turn off)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else adapters_disabled(model)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The frozen base model: preference-aware layers off (for the net's prompt embeddings)."""
    state = getattr(model, "meal_preference", None)
    if state is None:
        yield
        return
    prev, state.disabled = state.disabled, True
    try:
        yield
    finally:
        state.disabled = prev
