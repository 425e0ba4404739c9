"""The conditioning stage (method.md step 0): labels, the template, the corpus cache, the prompt mask,
and a tiny end-to-end run (fresh, reused from the cache, resumed)."""

import json
import os

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config

from meal.config import TemplateConfig
from meal.harness.budget import Budget
from meal.harness.conditioning import achieved_labels
from meal.harness.corpus import ScoredCorpus
from meal.methods import train
from meal.policy.losses import IGNORE, build_batch
from meal.policy.rollout import Conditioner
from meal.policy.templates import parse_preference

# one prompt group of four responses: two extremes, a balanced one, and one dominated by all three
GROUP = torch.tensor([[2.0, -2.0], [0.0, 0.0], [-2.0, 2.0], [-3.0, -3.0]])


def test_region_labels_pick_the_best_response_under_each_preference():
    """w . R: (2,-2) scores 2(w1 - w2), (0,0) scores 0, (-2,2) scores 2(w2 - w1), (-3,-3) scores -3.
    So w1 > 0.5 selects row 0, w1 < 0.5 row 2, and the dominated row 3 is never selected."""
    rows, labels = achieved_labels(GROUP, [0, 0, 0, 0], "region", np.random.default_rng(0), per_group=200)
    assert len(rows) == 200 and labels.shape == (200, 2)
    torch.testing.assert_close(labels.sum(1), torch.ones(200))
    assert (labels >= 0).all()
    assert 3 not in rows.tolist()
    w1 = labels[:, 0]
    assert (w1[torch.as_tensor(rows == 0)] > 0.5).all() and (w1[torch.as_tensor(rows == 2)] < 0.5).all()
    assert {0, 2} <= set(rows.tolist())


def test_rank_and_softmax_labels_by_hand():
    """rank: objective 1 ranks rows (0, 1, 2, 3) as 3,2,1,0 -> (1, 2/3, 1/3, 0); objective 2 as
    (1/3, 2/3, 1, 0). Row 0: (1, 1/3) / (4/3) = (0.75, 0.25); row 1: (0.5, 0.5); row 3: all 0 -> uniform.
    softmax(R / tau) with tau = 2 on (2, -2): softmax(1, -1) = (e / (e + 1/e), ...)."""
    rows, labels = achieved_labels(GROUP, [0, 0, 0, 0], "rank", np.random.default_rng(0))
    assert rows.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(labels, torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0.5, 0.5]]))
    rows, labels = achieved_labels(GROUP, [0, 0, 0, 0], "softmax", np.random.default_rng(0), tau=2.0)
    e = np.e
    torch.testing.assert_close(labels[0], torch.tensor([e / (e + 1 / e), (1 / e) / (e + 1 / e)]))
    with pytest.raises(ValueError, match="unknown rule"):
        achieved_labels(GROUP, [0] * 4, "magic", np.random.default_rng(0))


def test_labels_come_out_of_the_template_unchanged(tokenizer_dir):
    """The label written by the one template function reads back (to its two decimals)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    _, labels = achieved_labels(torch.randn(12, 3), [0] * 6 + [1] * 6, "region", np.random.default_rng(1))
    cond = Conditioner(TemplateConfig(user="{text}\n\n(Preference weights: {preference}.)"), ["a", "b", "c"], tok)
    for prompt, w in zip(cond(["q"] * len(labels), labels), labels):
        assert parse_preference(prompt, ["a", "b", "c"]) == pytest.approx(w.tolist(), abs=0.005 + 1e-6)


def test_the_stage_trains_on_the_response_tokens_only(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cond = Conditioner(TemplateConfig(), ["a", "b"], tok)
    w = torch.tensor([[0.3, 0.7]])
    prompt = cond(["what is rain?"], w)[0]
    batch = build_batch(tok, [prompt], ["water falling"], [True], prefs=w)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert (batch.labels[0, :n_prompt] == IGNORE).all()
    assert (batch.labels[0, n_prompt:] != IGNORE).all()  # the response and its eos
    torch.testing.assert_close(batch.prefs, w)


def test_corpus_round_trips_and_refuses_a_torn_file(tmp_path):
    c = ScoredCorpus(["a", "b"], ["t1", "t1"], ["r1", "r2"], [True, False], [0, 0], torch.tensor([[1., 2.], [3., 4.]]),
                     "pool", Budget(responses=2, tokens=9))
    c.save(str(tmp_path / "c.jsonl"))
    d = ScoredCorpus.load(str(tmp_path / "c.jsonl"))
    assert d.responses == c.responses and d.finished == c.finished and torch.equal(d.raw, c.raw)
    assert d.budget.tokens == 9
    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    (tmp_path / "c.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match="1 rows, the header says 2"):
        ScoredCorpus.load(str(tmp_path / "c.jsonl"))


def _stage_config(tiny_llama, out, cache, **over):
    base = {"conditioning.enabled": True, "conditioning.steps": 4, "conditioning.batch_size": 4,
            "conditioning.micro_batch_size": 2, "conditioning.pool_prompts": 4, "conditioning.save_every": 2,
            "conditioning.cache": cache, "task.pool_instructions": ["", "Be brief."],
            "policy.lora": {"enabled": True, "preference_aware": True, "r": 2, "alpha": 4},
            "trainer.iterations": 1}
    base.update(over)
    return tiny_config(tiny_llama, out, **base)


def test_stage_end_to_end_cached_and_rebuilt_when_a_reward_changes(tiny_llama, tmp_path):
    """A run with the stage writes its record; a second run (other seed) reuses corpus and policy from
    the cache without sampling or training; changing a reward's spec builds a new corpus."""
    cache = str(tmp_path / "cache")
    first = _stage_config(tiny_llama, str(tmp_path / "a"), cache)
    train(first)
    stage = json.load(open(tmp_path / "a" / "conditioning" / "stage.json"))
    assert stage["corpus"]["rows"] == 4 * 2 and stage["sft"]["steps"] == 4
    assert stage["budget"]["responses"] == 8 and stage["budget"]["reward_calls"] == 16
    assert len(open(tmp_path / "a" / "conditioning" / "metrics.jsonl").readlines()) == 4
    stats = json.load(open(tmp_path / "a" / "reward_stats.json"))
    assert stats["source"] == "conditioning corpus"
    before = sorted(os.listdir(cache))
    assert sum(f.startswith("corpus-") and f.endswith(".jsonl") for f in before) == 1
    assert sum(f.startswith("stage-") for f in before) == 1

    second = _stage_config(tiny_llama, str(tmp_path / "b"), cache, **{"trainer.seed": 5})
    train(second)
    assert sorted(os.listdir(cache)) == before  # nothing new: both came from the cache
    a = torch.load(tmp_path / "a" / "checkpoints" / "step_000001" / "state.pt", weights_only=False)
    assert a["budget"]["steps"] == 1
    from safetensors.torch import load_file

    sa = load_file(str(tmp_path / "a" / "conditioning" / "policy.safetensors"))
    sb = load_file(str(tmp_path / "b" / "conditioning" / "policy.safetensors"))
    assert all(torch.equal(sa[n], sb[n]) for n in sa)

    changed = _stage_config(tiny_llama, str(tmp_path / "c"), cache)
    changed["rewards"]["concise"] = {"_target_": "meal.rewards.embedded.Brevity", "scale": 5.0}
    train(changed)
    after = sorted(os.listdir(cache))
    assert sum(f.startswith("corpus-") and f.endswith(".jsonl") for f in after) == 2

    # a pool sampled in bf16 is not the float32 one: another precision builds its own corpus and stage
    train(_stage_config(tiny_llama, str(tmp_path / "d"), cache, **{"policy.dtype": "bfloat16"}))
    bf16 = sorted(set(os.listdir(cache)) - set(after))
    assert sum(f.startswith("corpus-") and f.endswith(".jsonl") for f in bf16) == 1
    assert sum(f.startswith("stage-") for f in bf16) == 1
    assert json.load(open(tmp_path / "d" / "conditioning" / "stage.json"))["key"]["policy"]["dtype"] == "bfloat16"


def test_stage_resumes_from_its_checkpoint(tiny_llama, tmp_path):
    """A stage stopped after its step-2 checkpoint continues from it: same weights as an uninterrupted stage."""
    from safetensors.torch import load_file

    from meal.harness import conditioning

    full = _stage_config(tiny_llama, str(tmp_path / "full"), str(tmp_path / "c1"))
    train(full)
    broken = _stage_config(tiny_llama, str(tmp_path / "broken"), str(tmp_path / "c2"))
    real = conditioning.policy_step
    calls = []

    def stop_at_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    conditioning.policy_step = stop_at_third
    try:
        with pytest.raises(KeyboardInterrupt):
            train(broken)
    finally:
        conditioning.policy_step = real
    resumed = _stage_config(tiny_llama, str(tmp_path / "resumed"), str(tmp_path / "c2"))
    train(resumed)
    a = load_file(str(tmp_path / "full" / "conditioning" / "policy.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "conditioning" / "policy.safetensors"))
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)
    steps = [json.loads(x)["step"] for x in open(tmp_path / "resumed" / "conditioning" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]  # the lost step 3 of the killed attempt is not repeated in the record


def test_dataset_responses_are_the_corpus(tiny_llama, tmp_path):
    """A task whose data set has responses (hh-rlhf schema on local files) conditions on them, not on a pool."""
    from tests.test_data import _hh_row

    train_file, test_file = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train_file.write_text("".join(json.dumps(_hh_row(f"q{i}", f"good answer {i}", "no")) + "\n" for i in range(4)))
    test_file.write_text("".join(json.dumps(_hh_row(f"t{i}", "good", "bad")) + "\n" for i in range(8)))
    cfg = _stage_config(tiny_llama, str(tmp_path / "run"), str(tmp_path / "cache"), **{
        "task.data": {"_target_": "meal.tasks.load_hh_rlhf",
                      "data_files": {"train": str(train_file), "test": str(test_file)}},
        "task.template": {"user": "<preference> {preference} </preference>\n\n{text}", "chat": False},
        "task.validation_prompts": 0})  # every training prompt's responses (one would be held out otherwise)
    train(cfg)
    stage = json.load(open(tmp_path / "run" / "conditioning" / "stage.json"))
    assert stage["corpus"]["source"] == "dataset" and stage["corpus"]["rows"] == 8
    assert stage["budget"]["responses"] == 0 and stage["budget"]["reward_calls"] == 16


def test_a_run_from_the_cached_stage_trains_like_the_run_that_built_it(tiny_llama, tmp_path):
    """The stage's in-memory result and its cached copy are the same start: same seed, same online losses."""
    cache = str(tmp_path / "cache")
    rows = []
    for name in ("built", "cached"):
        train(_stage_config(tiny_llama, str(tmp_path / name), cache, **{"trainer.iterations": 2}))
        rows.append([json.loads(x) for x in open(tmp_path / name / "metrics.jsonl")])
    for a, b in zip(*rows, strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-6)


def test_replay_mixes_the_stage_rows_into_each_step_and_resumes_exactly(tiny_llama, tmp_path):
    """trainer.replay=2: every real step holds the kept responses plus 2 labelled stage rows, the rows
    are written into the run folder, the step differs from a run without replay, and a resumed run
    replays the same rows as an uninterrupted one (same weights)."""
    from safetensors.torch import load_file

    from meal.harness.corpus import ReplaySet

    cache = str(tmp_path / "cache")
    over = {"trainer.iterations": 3, "trainer.replay": 2, "method.name": "static", "method.meta_learner": False,
            "method.lam": 1.0}
    train(_stage_config(tiny_llama, str(tmp_path / "straight"), cache, **over))
    rows = [json.loads(x) for x in open(tmp_path / "straight" / "metrics.jsonl")]
    assert [r["train/replay_rows"] for r in rows] == [2, 2, 2]
    replay = ReplaySet.load(str(tmp_path / "straight" / "conditioning" / "replay.jsonl"))
    assert len(replay) > 0 and torch.allclose(replay.labels.sum(1), torch.ones(len(replay)))

    train(_stage_config(tiny_llama, str(tmp_path / "plain"), cache, **{**over, "trainer.replay": 0}))
    plain = [json.loads(x) for x in open(tmp_path / "plain" / "metrics.jsonl")]
    assert plain[0]["train/replay_rows"] == 0 and plain[0]["train/loss"] != rows[0]["train/loss"]

    train(_stage_config(tiny_llama, str(tmp_path / "halves"), cache, **{**over, "trainer.iterations": 1}))
    train(_stage_config(tiny_llama, str(tmp_path / "halves"), cache, **{**over, "trainer.resume": True}))
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "step_000003" / "policy.safetensors"))
    b = load_file(str(tmp_path / "halves" / "checkpoints" / "step_000003" / "policy.safetensors"))
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)


def test_a_run_without_the_stage_has_nothing_to_replay(tiny_llama, tmp_path):
    train(tiny_config(tiny_llama, str(tmp_path / "r"), **{"trainer.replay": 2, "trainer.iterations": 1}))
    rows = [json.loads(x) for x in open(tmp_path / "r" / "metrics.jsonl")]
    assert rows[0]["train/replay_rows"] == 0
