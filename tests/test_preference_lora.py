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


def test_gradient_checkpointing_recomputes_each_layer_with_its_preference(tiny_llama):
    """The paper's config (policy=llama2_7b_lora, preference-aware LoRA in both paper tasks) checkpoints
    activations: the backward pass recomputes each layer after the forward pass's preference block has
    ended. The recomputation must see the same preferences: the real step's gradients and the virtual
    step's meta-gradient (through the label path, whose preferences carry a graph) are those without
    checkpointing."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from meal.methods.bilevel import InnerLoss, MetaGradSettings, meta_gradient

    def grads(checkpointing):
        cfg = PolicyConfig(name_or_path=tiny_llama, dtype="float32", gradient_checkpointing=checkpointing,
                           lora=LoraConfig(enabled=True, r=2, alpha=4, preference_aware=True))
        model, tok = load_policy(cfg, 2)
        params = trainable_parameters(model)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in params.values():
                p.normal_(0, 0.1)
        w = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
        batch = build_batch(tok, ["post one", "post two"], ["a b c", "d e"], prefs=w)
        model.train()
        per_example_nll(model, batch).mean().backward()
        real = {n: p.grad.clone() for n, p in params.items()}
        phi = torch.tensor([0.2, -0.1], requires_grad=True)  # the labels' logits: the label path's preferences
        inner = InnerLoss(batch, lambda: torch.ones(2), lambda: torch.softmax(phi, 0).expand(2, 2))
        hyper = {}
        for mode in ("per_example", "jvp"):  # forward-mode AD too (under the math attention kernel, as Meal)
            phi.grad = None
            with sdpa_kernel(SDPBackend.MATH):
                meta_gradient(model, params, inner, lambda p: per_example_nll(model, batch, p).mean(), [phi],
                              MetaGradSettings(0.1, engine="directional", mode=mode))
            hyper[mode] = phi.grad.clone()
        assert model.model.layers[0].gradient_checkpointing is checkpointing  # back on after the meta step
        return real, hyper

    plain, hyper = grads(False)
    checkpointed, hyper_ckpt = grads(True)
    assert plain.keys() == checkpointed.keys() and any(g.abs().sum() > 0 for g in plain.values())
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n])
    for mode in hyper:
        assert hyper[mode].abs().sum() > 0
        torch.testing.assert_close(hyper_ckpt[mode], hyper[mode])


def test_repeated_rows_read_their_prompt_once_and_sample_what_unshared_rows_sample(tiny_llama, monkeypatch):
    """Issue 21: an online rollout's N samples of one (prompt, preference) share the prompt's cache. The
    prompt is read once per distinct row (same text and same preference: a row with the same text under
    another preference is another row for preference-aware layers), and every response is the one the
    unshared call samples (row-seeded draws, float32)."""
    import meal.policy.sampling as sampling
    from meal.policy.sampling import GenerationSettings, generate

    model, tok = _policy(tiny_llama)
    with torch.no_grad():
        for n, p in trainable_parameters(model).items():
            if "pref_lora_B" in n:
                p.normal_(std=0.5)
    prompts = ["hello there", "a much longer prompt about the weather", "hello there"]
    prefs = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.0, 1.0]])
    rows = [p for p in prompts for _ in range(3)]
    row_prefs = prefs.repeat_interleave(3, 0)
    settings = GenerationSettings(max_new_tokens=10, batch_size=9, seeding="row")
    read = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: read.append(kw["input_ids"].shape), with_kwargs=True)
    shared = generate(model, tok, rows, settings, generator_seed=3, prefs=row_prefs, row_keys=rows)
    hook.remove()
    full = tok(rows, padding=True, add_special_tokens=False)["input_ids"]
    assert read[0] == (3, len(full[0]) - 1)  # the 3 distinct rows, all but the last prompt token
    assert read[1] == (9, 1)  # then every row reads its last prompt token against the copied cache
    monkeypatch.setattr(sampling, "shared_prefill", lambda *args: {})
    unshared = generate(model, tok, rows, settings, generator_seed=3, prefs=row_prefs, row_keys=rows)
    assert shared.texts == unshared.texts and shared.ids == unshared.ids
    assert len(set(shared.texts)) > 3  # sampled: repeats of a row get different responses
    assert sampling.shared_prefill(model, tok(prompts, return_tensors="pt", padding=True), prompts, prefs) == {}


@pytest.mark.parametrize("mode", ["row", "call", "greedy"])
def test_ended_rows_leave_the_batch_and_the_others_get_what_generate_gives_them(tiny_llama, mode):
    """Issue 21: meal's decoding loop drops a row from the batch (cache, mask, preferences) once it ends, and
    every response is still the one Hugging Face's ``generate`` gives it with the same draws, which keeps
    ended rows to the last step: per-row generators ("row"), the process's stream ("call": multinomial of
    the warped softmax) and greedy. Rows repeat (the shared prompt cache is in play) and have their own
    preferences; the end-of-sequence token is one the responses draw at different steps, so rows end
    early, at different steps, and leave the batch."""
    from transformers import LogitsProcessorList

    from meal.policy.sampling import GenerationSettings, RowDraw, SamplingWarper, generate, row_seeds

    model, tok = _policy(tiny_llama)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in trainable_parameters(model).items():
            if "pref_lora_B" in n:
                p.normal_(std=0.5)
    prompts = ["hello there", "hello there", "a much longer prompt about the weather", "hi", "hi",
               "tell me about cats", "one two three four five six", "why"]
    prefs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.3, 0.7], [0.5, 0.5], [0.5, 0.5], [0.0, 1.0], [0.8, 0.2],
                          [0.1, 0.9]])
    settings = GenerationSettings(max_new_tokens=12, batch_size=8, seeding="row" if mode == "row" else "call",
                                  greedy=mode == "greedy")
    probe = generate(model, tok, prompts, settings, generator_seed=5, prefs=prefs)
    first = {}  # token -> the step at which each row first draws it
    for b, row in enumerate(probe.ids):
        for t, token in enumerate(row[:-1]):
            first.setdefault(token, {}).setdefault(b, t)
    eos = max(first, key=lambda k: (len(set(first[k].values())), -len(first[k])))  # ends rows at the most steps
    tok.eos_token = tok.convert_ids_to_tokens(eos)
    assert tok.eos_token_id == eos != tok.pad_token_id

    rows_read = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: rows_read.append(kw["input_ids"].shape[0]),
                                           with_kwargs=True)
    ours = generate(model, tok, prompts, settings, generator_seed=5, prefs=prefs)
    hook.remove()

    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad(), torch.random.fork_rng(), preference_weights(model, prefs):
        torch.manual_seed(5)
        if mode == "row":
            gens = [torch.Generator().manual_seed(s) for s in row_seeds(5, prompts)]
            kw = {"do_sample": False, "logits_processor": LogitsProcessorList([RowDraw(SamplingWarper(top_p=0.9), gens)])}
        elif mode == "greedy":
            kw = {"do_sample": False}
        else:
            kw = {"do_sample": True, "top_p": 1.0, "top_k": 0, "temperature": 1.0,
                  "logits_processor": LogitsProcessorList([SamplingWarper(top_p=0.9)])}
        out = model.generate(**enc, max_new_tokens=12, eos_token_id=eos, pad_token_id=tok.pad_token_id, **kw)
    reference = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        reference.append(row[:row.index(eos) + 1] if eos in row else row)
    assert ours.ids == reference
    ends = [len(r) for r, done in zip(ours.ids, ours.finished) if done]
    assert len(set(ends)) >= 2 and min(ends) < 12  # rows ended early, at different steps
    assert rows_read[0] == 6 and rows_read[1] == 8  # the distinct rows' shared prompt pass, then every row
    assert min(rows_read[2:]) < 8  # and the rows that ended left the batch
