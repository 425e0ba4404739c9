"""Rewards: embedded formulas, the registry, normalisation, and each HF input convention."""

import math
import os

import pytest
import torch

from meal.rewards import CallableReward, RewardError, RewardNormalizer, RewardSet, build_reward
from meal.rewards.embedded import Brevity, RougeCoverage, RougeFaithfulness, VaderSentiment
from meal.rewards.hf import ResponseOnlyReward, SummaryBosPostReward, TextAndPairReward, TextPairReward


def my_length_reward(prompts, responses):
    """A user's reward, importable by dotted path (tests.test_rewards.my_length_reward)."""
    return [float(len(r)) for r in responses]


def test_brevity_formula():
    """-log(1 + words / 10): 10 words -> -log 2; 5 words -> -log 1.5; under 3 words (empty, 'ok')
    scores as 50 words -> -log 6, below every real answer of up to 50 words."""
    got = Brevity(scale=10).score(["p"] * 4, [" ".join(["w"] * 10), "a b c d e", "", "ok"])
    torch.testing.assert_close(got, torch.tensor([-math.log(2.0), -math.log(1.5), -math.log(6.0), -math.log(6.0)]))


def test_rouge_coverage_and_faithfulness_by_hand():
    """Source 'the cat sat on the mat' (6 tokens). Response 'the cat' covers LCS 2 of 6 -> recall 1/3;
    its single bigram 'the cat' occurs in the source -> ROUGE-2 precision 1."""
    src, resp = "the cat sat on the mat", "the cat"
    torch.testing.assert_close(RougeCoverage().score([src], [resp]), torch.tensor([1 / 3]))
    torch.testing.assert_close(RougeFaithfulness().score([src], [resp]), torch.tensor([1.0]))
    assert RougeFaithfulness().score([src], ["dogs bark loudly"]).item() == 0.0


def test_vader_orders_sentiment():
    s = VaderSentiment().score(["q", "q"], ["This is wonderful, thank you so much!", "This is awful and I hate it."])
    assert s[0] > 0.5 and s[1] < -0.5


def test_user_callable_by_dotted_path_and_by_spec():
    r = build_reward("mine", "tests.test_rewards.my_length_reward")
    assert r.score(["p"], ["abcd"]).tolist() == [4.0]
    r2 = build_reward("mine", {"_target_": "meal.rewards.CallableReward", "fn": "tests.test_rewards.my_length_reward"})
    assert r2.score(["p"], ["ab"]).tolist() == [2.0]


def test_unknown_reward_names_the_reward():
    with pytest.raises(RewardError, match="nope"):
        RewardSet.from_config({"concise": {"_target_": "meal.rewards.embedded.Brevity"}}, ["concise", "nope"])
    with pytest.raises(RewardError, match="cannot import reward 'no.such.module.fn'"):
        build_reward("x", "no.such.module.fn")


def test_reward_set_matrix_and_nan_rejection():
    rs = RewardSet({"len": CallableReward(my_length_reward), "neg": CallableReward(lambda p, r: [-1.0] * len(r))},
                   ["len", "neg"])
    torch.testing.assert_close(rs.score(["a", "b"], ["xy", "xyz"]), torch.tensor([[2.0, -1.0], [3.0, -1.0]]))
    bad = RewardSet({"nan": CallableReward(lambda p, r: [0.0, float("nan")])}, ["nan"])
    with pytest.raises(RewardError, match=r"reward 'nan' returned nan .* index 1"):
        bad.score(["a", "b"], ["ok", "broken"])
    short = RewardSet({"short": CallableReward(lambda p, r: [0.0])}, ["short"])
    with pytest.raises(RewardError, match="returned 1 values for 2"):
        short.score(["a", "b"], ["x", "y"])


def test_normalizer_fit_apply_save_load(tmp_path):
    """Column a: [1, 3] -> mean 2, std sqrt(2); column b constant -> std 1 (not blown up)."""
    raw = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    norm = RewardNormalizer.fit(raw, ["a", "b"])
    torch.testing.assert_close(norm(raw), torch.tensor([[-1 / math.sqrt(2), 0.0], [1 / math.sqrt(2), 0.0]]))
    path = str(tmp_path / "stats.json")
    norm.save(path)
    assert RewardNormalizer.load(path, ["a", "b"]) == norm
    with pytest.raises(RewardError, match="are for"):
        RewardNormalizer.load(path, ["b", "a"])
    open(path, "w").write("{not json")
    with pytest.raises(RewardError, match="unreadable"):
        RewardNormalizer.load(path)


# ---- Hugging Face sequence-classification reward models, one class per input convention ----

class Recorder:
    """Wraps a tokenizer and records the (text, text_pair) each call receives."""

    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def __call__(self, text, text_pair=None, **kw):
        self.calls.append((list(text), None if text_pair is None else list(text_pair)))
        return self.tok(text, text_pair, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A tiny random BERT classifier (3 logits) with the MiniLM WordPiece tokenizer (pairs supported)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from meal.rewards.embedded import minilm_path

    out = str(tmp_path_factory.mktemp("clf"))
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=3))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


PROMPTS = ["Human: how do I sleep better?\n\nAssistant:", "A long post about a roommate who never cleans."]
RESPONSES = ["Keep a regular schedule.", "Roommate never cleans."]


@pytest.mark.parametrize("cls,expect", [
    (TextPairReward, lambda bos: (PROMPTS, RESPONSES)),
    (ResponseOnlyReward, lambda bos: (RESPONSES, None)),
    (SummaryBosPostReward, lambda bos: ([f"{r} {bos} {p}" for p, r in zip(PROMPTS, RESPONSES)], None)),
    (TextAndPairReward, lambda bos: (RESPONSES, PROMPTS)),
])
def test_each_convention_feeds_the_expected_text_and_reads_the_configured_logit(tiny_classifier, cls, expect):
    reward = cls(tiny_classifier, logit_index=2, device="cpu")
    reward.tokenizer = Recorder(reward.tokenizer)
    got = reward.score(PROMPTS, RESPONSES)
    bos = reward.tokenizer.bos_token or ""
    assert reward.tokenizer.calls == [expect(bos)]
    text, pair = expect(bos)
    enc = reward.tokenizer.tok(text, pair, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        want = reward.model(**enc).logits[:, 2]
    torch.testing.assert_close(got, want)


def test_logit_index_out_of_range_is_reported(tiny_classifier):
    with pytest.raises(ValueError, match="logit_index 5 out of range"):
        TextPairReward(tiny_classifier, logit_index=5, device="cpu")


def test_hf_reward_builds_from_config(tiny_classifier):
    r = build_reward("humor", {"_target_": "meal.rewards.hf.ResponseOnlyReward",
                               "model_name_or_path": tiny_classifier, "logit_index": 1, "device": "cpu"})
    assert r.score(["p"], ["a joke"]).shape == (1,)
    with pytest.raises(RewardError, match="humor"):
        build_reward("humor", {"_target_": "meal.rewards.hf.ResponseOnlyReward",
                               "model_name_or_path": os.path.join(tiny_classifier, "missing"), "logit_index": 1})
