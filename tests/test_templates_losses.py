"""Preference templates round-trip; the SFT loss covers exactly the response tokens."""

import pytest
import torch

from meal.config import TemplateConfig
from meal.policy.losses import IGNORE, build_batch, per_example_nll
from meal.policy.templates import build_prompt, format_preference, parse_preference


def test_preference_format_and_parse_round_trip(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    objectives = ["helpful", "concise", "positive"]
    for pref in ([0.7, 0.3, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.0, 1.0], [0.125, 0.375, 0.5]):
        for chat in (True, False):
            tpl = TemplateConfig(user="Q: {text}\nWeights: {preference}", chat=chat, suffix="\nA:")
            prompt = build_prompt(tpl, "How do I boil an egg?", pref, objectives, tok)
            assert parse_preference(prompt, objectives) == [round(p, 2) for p in pref]
            assert "How do I boil an egg?" in prompt
    assert format_preference([0.7, 0.3], ["a", "b"]) == "a 0.70, b 0.30"


def test_chat_template_wraps_the_user_turn(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompt = build_prompt(TemplateConfig(user="{text} [{preference}]"), "hi", [0.5, 0.5], ["a", "b"], tok)
    assert prompt.startswith("<|im_start|>")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "hi [a 0.50, b 0.50]" in prompt


def test_parse_preference_rejects_prompt_without_preference():
    with pytest.raises(ValueError, match="no preference"):
        parse_preference("nothing here", ["a", "b"])


def test_loss_mask_covers_exactly_the_response_tokens(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompts = ["<|im_start|>user\nshort<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\na much longer prompt with many words<|im_end|>\n<|im_start|>assistant\n"]
    responses = ["Sure, here it is.", "No."]
    batch = build_batch(tok, prompts, responses, finished=[True, False])
    for i, (p, r, done) in enumerate(zip(prompts, responses, [True, False])):
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        r_ids = tok(r, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if done else [])
        labels = batch.labels[i]
        kept = labels[labels != IGNORE].tolist()
        assert kept == r_ids  # exactly the response (+ eos when it finished), nothing else
        assert (labels[:len(p_ids)] == IGNORE).all()
        assert batch.input_ids[i, :len(p_ids) + len(r_ids)].tolist() == p_ids + r_ids
        assert batch.attention_mask[i].sum().item() == len(p_ids) + len(r_ids)


def test_per_example_nll_is_token_mean_over_response(tiny_llama):
    """NLL and its gradient computed by hand from the whole sequence's logits equal per_example_nll's (which
    computes the logits from the earliest response position on only), with prompts of different lengths."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    prompts = ["<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\na longer question, with more words<|im_end|>\n<|im_start|>assistant\n"]
    batch = build_batch(tok, prompts, ["a b c", "d"])
    weight = model.model.layers[0].mlp.down_proj.weight
    got = per_example_nll(model, batch)
    assert got.shape == (2,)
    got_grad, = torch.autograd.grad(got.sum(), weight)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    wants = []
    for i in range(2):
        pos = (batch.labels[i] != IGNORE).nonzero().flatten()
        logp = torch.log_softmax(logits[i, pos - 1], -1)
        wants.append(-logp[torch.arange(len(pos)), batch.input_ids[i, pos]].mean())
    want_grad, = torch.autograd.grad(sum(wants), weight)
    torch.testing.assert_close(got, torch.stack(wants).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)
