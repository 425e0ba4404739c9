"""The conditioning stage's cache of the frozen lower layers: a forward pass that starts at the first
adapted layer from cached states gives the loss and the gradients of the whole pass."""

import logging
import re

import pytest
import torch

from tests.conftest import tiny_config

from meal.config import LoraConfig, PolicyConfig
from meal.methods import train
from meal.policy.frozen_layers import FrozenLayerCache, cacheable_layers, skip_frozen_layers
from meal.policy.losses import build_batch, per_example_nll
from meal.policy.model import load_policy, trainable_parameters

PROMPTS = ["hello there", "a longer prompt with more words in it", "yo", "what is the capital of France?"]
RESPONSES = ["fine, thanks", "ok", "a reply of several tokens here", "Paris"]
PREFS = torch.tensor([[1.0, 0.0], [0.2, 0.8], [0.5, 0.5], [0.9, 0.1]])


def _policy(tiny_llama, layers_from):
    cfg = PolicyConfig(name_or_path=tiny_llama, dtype="float32",
                       lora=LoraConfig(enabled=True, r=2, alpha=4, preference_aware=True, layers_from=layers_from,
                                       target_modules=["q_proj", "v_proj"]))
    model, tok = load_policy(cfg, 2)
    for name, p in trainable_parameters(model).items():  # adapters that change the output (B starts at zero)
        torch.nn.init.normal_(p, std=0.3)
    return model, tok


def _loss_and_grads(model, batch):
    params = trainable_parameters(model)
    model.zero_grad()
    nll = per_example_nll(model, batch)
    nll.sum().backward()
    return nll.detach(), {n: p.grad.clone() for n, p in params.items()}


def test_only_frozen_lower_layers_are_cached(tiny_llama):
    assert cacheable_layers(_policy(tiny_llama, 1)[0]) == (1, "")
    first, why = cacheable_layers(_policy(tiny_llama, 0)[0])
    assert first == 0 and "first decoder layer" in why


def test_cached_lower_layers_give_the_loss_and_gradients_of_the_whole_pass(tiny_llama):
    """Rows read in one batch and served from the cache in another of other rows and another width: the same
    per-example losses and adapter gradients as the forward pass through every layer; the lower layers ran
    once per row."""
    model, tok = _policy(tiny_llama, 1)
    cache = FrozenLayerCache(model, 1)
    for keys in ([0, 1], [2, 0, 3, 1]):  # rows 0 and 1 come back in a wider batch, with new rows beside them
        batch = build_batch(tok, [PROMPTS[k] for k in keys], [RESPONSES[k] for k in keys], prefs=PREFS[keys])
        want_loss, want_grads = _loss_and_grads(model, batch)
        batch.hidden = cache.inputs(keys, batch.input_ids, batch.attention_mask, batch.prefs)
        batch.hidden_layer = cache.first
        got_loss, got_grads = _loss_and_grads(model, batch)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6)
        assert all(g.abs().sum() > 0 for g in got_grads.values())
    assert (cache.computed, cache.served) == (4, 6)
    # the states stand in for the lower layers' output: other states give another loss
    with skip_frozen_layers(model, 1, torch.zeros_like(batch.hidden)):
        other = per_example_nll(model, build_batch(tok, [PROMPTS[k] for k in keys], [RESPONSES[k] for k in keys],
                                                   prefs=PREFS[keys]))
    assert not torch.allclose(other, want_loss, atol=1e-3)
    assert len(model.get_decoder().layers) == 2  # every layer back in place after the block


@pytest.mark.parametrize("layers_from", [1, 0])
def test_the_stage_with_the_cache_trains_the_policy_it_trains_without(tiny_llama, tmp_path, caplog, layers_from):
    from safetensors.torch import load_file

    def stage(name, on):
        cfg = tiny_config(tiny_llama, str(tmp_path / name), **{
            "conditioning.enabled": True, "conditioning.steps": 6, "conditioning.batch_size": 4,
            "conditioning.micro_batch_size": 2, "conditioning.pool_prompts": 4, "conditioning.save_every": 0,
            "conditioning.labels_per_group": 1,
            "conditioning.cache": str(tmp_path / f"cache_{name}"), "conditioning.frozen_layer_cache": on,
            "task.pool_instructions": ["", "Be brief."], "trainer.iterations": 1,
            "policy.lora": {"enabled": True, "preference_aware": True, "r": 2, "alpha": 4, "layers_from": layers_from}})
        train(cfg)
        return load_file(str(tmp_path / name / "conditioning" / "policy.safetensors"))

    with caplog.at_level(logging.INFO, logger="meal.harness.conditioning"):
        cached = stage("cached", True)
    said = [r.getMessage() for r in caplog.records if "frozen_layer_cache" in r.getMessage()]
    if layers_from:  # 6 steps of 4 rows over at most 8 labelled rows (4 groups of 2): each row's lower layer ran once
        computed, served = re.search(r"layers 0-0 ran for (\d+) of (\d+) row reads", said[-1]).groups()
        assert int(computed) <= 8 and int(served) == 24
    else:
        assert said and "not used" in said[-1]
    plain = stage("plain", False)
    assert set(cached) == set(plain)
    for n in plain:
        torch.testing.assert_close(cached[n], plain[n], rtol=1e-4, atol=1e-5)
