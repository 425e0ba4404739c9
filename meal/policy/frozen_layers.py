"""The frozen lower layers of a policy whose adapters start higher up (``policy.lora.layers_from``).

Below the first decoder layer that holds a trainable parameter, nothing changes while the policy trains:
the output of those layers for a given token row is the same at every step. The conditioning stage reads
each of its labelled rows about three times (the demo: 100 steps of 8 rows over 256 rows), and the lower
layers' forward is about a fifth of an SFT step's FLOPs (BENCHMARKS.md, "Where the stage's SFT positions
go"). :class:`FrozenLayerCache` computes a row's hidden state at the input of the first trainable layer
once, the first time the row is read, and :func:`skip_frozen_layers` runs a forward pass from that layer
on: the lower layers are left out of the module list for the duration of the call and the first kept
layer's input is replaced by the cached states (the embedding lookup still runs; it is cheap and its
output is discarded).

What is computed is the same up to the rounding of another batch shape: a row's lower-layer states are
those of the first batch it was read in, cut to its own tokens; the right padding of a later batch gets
zeros there, which no real position attends to (causal attention, padding masked) and the loss never reads.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from meal.policy.preference_lora import layer_index, preference_weights


def decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList] | None:
    """``(decoder, decoder.layers)`` of a Hugging Face causal LM (peft-wrapped or not), else None."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    layers = getattr(decoder, "layers", None)
    return (decoder, layers) if isinstance(layers, nn.ModuleList) else None


def first_trainable_layer(model: nn.Module) -> int:
    """The lowest decoder layer that holds a trainable parameter; 0 when a trainable parameter lies outside
    the decoder layers (embeddings, head, a full fine-tune) or nothing is trainable."""
    found = [layer_index(name) for name, p in model.named_parameters() if p.requires_grad]
    if not found or any(i is None for i in found):
        return 0
    return min(found)


def cacheable_layers(model: nn.Module) -> tuple[int, str]:
    """``(first, why)``: the number of frozen lower layers whose output can be cached (0: none), and why not."""
    found = decoder_layers(model)
    if found is None:
        return 0, "the policy has no decoder layer list (get_decoder().layers)"
    first = first_trainable_layer(model)
    if first == 0:
        return 0, "a trainable parameter lies in the first decoder layer or outside the decoder layers"
    lower = list(found[1])[:first]
    if getattr(model.config, "attention_dropout", 0.0) or any(
            isinstance(m, nn.Dropout) and m.p > 0 for layer in lower for m in layer.modules()):
        return 0, "the lower layers apply dropout: their output is not the same at every step"
    return first, ""


class _Captured(Exception):
    """Raised by the hook that took the first trainable layer's input: the rest of the forward pass is not needed."""


class FrozenLayerCache:
    """Each row's hidden states at the input of decoder layer ``first`` ((T_row, D), its own tokens only),
    keyed by the caller's row id, computed the first time the row is asked for."""

    def __init__(self, model: nn.Module, first: int):
        self.model, self.first = model, first
        self.states: dict[int, torch.Tensor] = {}
        self.computed = 0  # rows whose lower layers ran (the rest came from the cache)
        self.served = 0

    def inputs(self, keys: Sequence[int], input_ids: torch.Tensor, attention_mask: torch.Tensor,
               prefs: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden states (B, T, D) at layer ``first``'s input of a right-padded batch whose row b is row
        ``keys[b]``: cached rows read back, the others computed (in one pass) and kept; zeros on padding."""
        lengths = attention_mask.sum(1).tolist()
        missing = [b for b, k in enumerate(keys) if k not in self.states]
        if missing:
            idx = torch.tensor(missing, device=input_ids.device)
            width = max(lengths[b] for b in missing)
            hidden = self._lower(input_ids[idx, :width], attention_mask[idx, :width],
                                 None if prefs is None else prefs[idx.to(prefs.device)])
            for j, b in enumerate(missing):
                self.states[keys[b]] = hidden[j, :lengths[b]].clone()
            self.computed += len(missing)
        self.served += len(keys)
        some = self.states[keys[0]]
        out = some.new_zeros(len(keys), input_ids.shape[1], some.shape[-1])
        for b, k in enumerate(keys):
            out[b, :lengths[b]] = self.states[k]
        return out

    def _lower(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefs: torch.Tensor | None) -> torch.Tensor:
        decoder, layers = decoder_layers(self.model)
        taken: list[torch.Tensor] = []

        def take(module, args, kwargs):
            taken.append(args[0] if args else kwargs["hidden_states"])
            raise _Captured

        hook = layers[self.first].register_forward_pre_hook(take, with_kwargs=True)
        try:
            with torch.no_grad(), preference_weights(self.model, prefs):
                decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Captured:
            pass
        finally:
            hook.remove()
        if not taken:
            raise RuntimeError(f"decoder layer {self.first} never ran: cannot cache the layers below it")
        return taken[0]


@contextlib.contextmanager
def skip_frozen_layers(model: nn.Module, first: int, hidden: torch.Tensor) -> Iterator[None]:
    """Within the block, a forward pass of ``model`` runs decoder layers ``first`` and above only, the first of
    them reading ``hidden`` ((B, T, D), :meth:`FrozenLayerCache.inputs`) instead of what the layers below would
    have given it."""
    decoder, layers = decoder_layers(model)
    kept = nn.ModuleList(list(layers)[first:])

    def replace(module, args, kwargs):
        if args:
            return (hidden.to(args[0].dtype),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden.to(kwargs["hidden_states"].dtype)}

    hook = kept[0].register_forward_pre_hook(replace, with_kwargs=True)
    decoder.layers = kept
    try:
        yield
    finally:
        decoder.layers = layers
        hook.remove()
