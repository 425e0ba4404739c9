"""Policy loading: dtype and device resolution, package resources, LoRA, and the embedded GGUF (slow)."""

import pytest
import torch

from meal.config import LoraConfig, PolicyConfig
from meal.policy.model import load_policy, package_folder, resolve_dtype, trainable_parameters


def test_dtype_resolution():
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) in (torch.bfloat16, torch.float32)


def test_missing_package_is_named():
    with pytest.raises(FileNotFoundError, match="package 'no_such_pkg_xyz' is not installed"):
        package_folder("pkg://no_such_pkg_xyz")


def test_local_folder_with_lora_targets(tiny_llama):
    cfg = PolicyConfig(name_or_path=tiny_llama, dtype="float32", attn_implementation="eager",
                       lora=LoraConfig(enabled=True, r=2, alpha=4, target_modules=["q_proj", "o_proj"]))
    model, tok = load_policy(cfg)
    names = list(trainable_parameters(model))
    assert names and all("lora_" in n for n in names)
    assert any("q_proj" in n for n in names) and any("o_proj" in n for n in names)
    assert not any("v_proj" in n for n in names)
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert model.config._attn_implementation == "eager"


def test_flash_attention_needs_cuda(tiny_llama):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="flash_attention_2 needs a CUDA device"):
        load_policy(PolicyConfig(name_or_path=tiny_llama, attn_implementation="flash_attention_2"))


@pytest.mark.parametrize("lora", ["none", "peft", "preference_aware"])
def test_prompt_embeddings_are_the_base_models_last_hidden_state(tiny_llama, lora):
    """The net's policy embeddings run the decoder alone; they must be the causal LM's own last hidden
    state (mean-pooled, normalised), with the adapters off, whatever wraps the model."""
    from meal.policy.embeddings import policy_embeddings
    from meal.policy.preference_lora import base_only, preference_weights

    cfg = PolicyConfig(name_or_path=tiny_llama, dtype="float32",
                       lora=LoraConfig(enabled=lora != "none", preference_aware=lora == "preference_aware", r=2,
                                       alpha=4, target_modules=["q_proj", "v_proj"]))
    model, tok = load_policy(cfg, num_objectives=2)
    with torch.no_grad():
        for p in trainable_parameters(model).values():  # adapters that would change the answer if left on
            p.add_(0.5)
    texts = ["Summarise this post about a cat.", "Hi", "A longer text, padded on the left of its batch."]
    got = policy_embeddings(model, tok, texts, batch_size=2)
    with torch.no_grad(), base_only(model):
        want = []
        for t in texts:
            enc = tok([t], return_tensors="pt")
            hidden = model(**enc, output_hidden_states=True, use_cache=False).hidden_states[-1]
            want.append(torch.nn.functional.normalize(hidden.mean(1), dim=-1))
    with torch.no_grad(), preference_weights(model, torch.tensor([[0.3, 0.7]])):
        adapted = model(**tok([texts[0]], return_tensors="pt"), output_hidden_states=True).hidden_states[-1]
    assert got.shape == (3, 32)
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-5)
    if lora != "none":  # the adapters are on again outside the context
        assert not torch.allclose(torch.nn.functional.normalize(adapted.mean(1), dim=-1), got[:1], atol=1e-3)


@pytest.mark.slow
def test_embedded_smollm2_loads_and_answers(tmp_path):
    """The embedded default, from the installed package, de-quantised into a cache folder (about 15 s)."""
    from meal.policy.sampling import GenerationSettings, generate

    cfg = PolicyConfig(gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", cache_dir=str(tmp_path))
    model, tok = load_policy(cfg)
    assert sum(p.numel() for p in model.parameters()) > 130e6
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name a fruit."}], tokenize=False,
                                     add_generation_prompt=True)
    out = generate(model, tok, [prompt], GenerationSettings(max_new_tokens=12), generator_seed=0)
    assert out.texts[0].strip()
    model2, _ = load_policy(cfg)  # second load reads the cached checkpoint
    assert len(list(tmp_path.iterdir())) == 1
