"""Preference-aware LoRA: starts as the base model, mixes one adapter per objective by each row's
preference, and works under functional_call (the virtual step) and in generation."""

import pytest
import torch

from meal.config import LoraConfig, PolicyConfig
from meal.policy.losses import build_batch, per_example_nll
from meal.policy.model import load_policy, trainable_parameters
from meal.policy.preference_lora import preference_weights


def _policy(tiny_llama, targets=("q_proj", "v_proj")):
    cfg = PolicyConfig(name_or_path=tiny_llama, dtype="float32",
                       lora=LoraConfig(enabled=True, r=2, alpha=4, preference_aware=True, target_modules=list(targets)))
    return load_policy(cfg, 2)


def test_untrained_adapter_is_the_base_model_and_only_adapters_train(tiny_llama):
    from transformers import AutoModelForCausalLM

    model, tok = _policy(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    params = trainable_parameters(model)
    assert params and all("pref_lora_" in n for n in params)
    a = params["model.layers.0.self_attn.q_proj.pref_lora_A"]
    assert a.shape == (3, 2, 32)  # K + 1 = 3 blocks (shared + one per objective), rank 2, width 32
    batch = build_batch(tok, ["hi", "yo"], ["a b", "c"], prefs=torch.tensor([[1.0, 0.0], [0.2, 0.8]]))
    torch.testing.assert_close(per_example_nll(model, batch), per_example_nll(base, batch))


def test_update_is_shared_plus_preference_weighted_blocks(tiny_llama):
    """With B_0 = 0 and B_1, B_2 set, the output at w = (0.5, 0.5) is the mean of the outputs at (1, 0)
    and (0, 1): the update is linear in w. A preference is required for every forward pass."""
    model, tok = _policy(tiny_llama, targets=("v_proj",))
    layer = model.model.layers[0].self_attn.v_proj
    torch.manual_seed(0)
    with torch.no_grad():
        layer.pref_lora_B[1:].normal_()
    x = torch.randn(1, 3, 32)

    def out(w):
        with preference_weights(model, torch.tensor([w])):
            return layer(x)

    torch.testing.assert_close(out([0.5, 0.5]), 0.5 * (out([1.0, 0.0]) + out([0.0, 1.0])))
    assert not torch.allclose(out([1.0, 0.0]), out([0.0, 1.0]))
    with pytest.raises(RuntimeError, match="without a preference"):
        layer(x)


def test_functional_call_and_generation_see_the_preference(tiny_llama):
    from meal.policy.sampling import GenerationSettings, generate

    model, tok = _policy(tiny_llama)
    params = trainable_parameters(model)
    with torch.no_grad():
        for n, p in params.items():
            if "pref_lora_B" in n:
                p.normal_(std=0.5)
    batch = build_batch(tok, ["hi"] * 2, ["a b"] * 2, prefs=torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    direct = per_example_nll(model, batch)
    assert direct[0] != direct[1]  # same text, different preference, different likelihood
    shifted = {n: p + 0.0 for n, p in params.items()}
    torch.testing.assert_close(per_example_nll(model, batch, shifted), direct)
    grads = torch.autograd.grad(direct.sum(), list(params.values()))
    assert all(torch.isfinite(g).all() for g in grads)
    g = generate(model, tok, ["hello"] * 2, GenerationSettings(max_new_tokens=4), generator_seed=0,
                 prefs=torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert len(g.texts) == 2
