"""The training loop on a tiny model: parameters move, checkpoints resume exactly, bad input is named."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config

from meal.config import ConfigError
from meal.harness.checkpoint import CheckpointError
from meal.methods import train


def _ckpt(run_dir, step):
    return load_file(os.path.join(run_dir, "checkpoints", f"step_{step:06d}", "policy.safetensors"))


@pytest.mark.parametrize("method", ["static", "meal"])
def test_two_steps_change_every_trainable_parameter(tiny_llama, tmp_path, method):
    from transformers import AutoModelForCausalLM

    over = {"method.name": method, "method.lam": 1.0 if method == "static" else 0.5,
            "method.meta_learner": method == "meal", "trainer.lr": 1e-2}
    summary = train(tiny_config(tiny_llama, str(tmp_path / "run"), **over))
    before = dict(AutoModelForCausalLM.from_pretrained(tiny_llama).named_parameters())
    after = _ckpt(str(tmp_path / "run"), 2)
    assert set(after) == set(before)  # full fine-tuning on the tiny model: every parameter is trainable
    unchanged = [n for n, p in after.items() if torch.equal(p, before[n].detach())]
    assert not unchanged
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2]
    assert {"train/loss", "reward/coverage", "reward/concise", "time/generate", "memory/real_step_mb"} <= set(lines[0])
    if method == "meal":
        assert {"meta/loss", "meta/grad_norm", "weights/coverage", "weights/entropy"} <= set(lines[0])
        assert lines[0]["meta/grad_norm"] > 0
    assert summary["iterations"] == 2


def test_lora_two_steps_change_every_adapter(tiny_llama, tmp_path):
    over = {"policy.lora": {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "trainer.lr": 1e-2}
    train(tiny_config(tiny_llama, str(tmp_path / "run"), **over))
    first, last = _ckpt(str(tmp_path / "run"), 1), _ckpt(str(tmp_path / "run"), 2)
    assert first and all("lora_" in n for n in first)
    assert all(not torch.equal(first[n], last[n]) for n in first)


def test_resume_continues_exactly(tiny_llama, tmp_path):
    """4 iterations straight == 2 iterations, stop, resume to 4 (same weights, same metrics)."""
    straight = tiny_config(tiny_llama, str(tmp_path / "a"), **{"trainer.iterations": 4})
    train(straight)
    half = tiny_config(tiny_llama, str(tmp_path / "b"), **{"trainer.iterations": 2})
    train(half)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(half)  # refuses to overwrite saved work
    train(tiny_config(tiny_llama, str(tmp_path / "b"), **{"trainer.iterations": 4, "trainer.resume": True}))
    a, b = _ckpt(str(tmp_path / "a"), 4), _ckpt(str(tmp_path / "b"), 4)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)
    la = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    lb = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["train/loss"] for r in la] == [r["train/loss"] for r in lb]


def test_corrupt_checkpoint_is_named_and_nothing_is_lost(tiny_llama, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tiny_llama, str(run)))
    target = run / "checkpoints" / "step_000002" / "policy.safetensors"
    target.write_bytes(b"garbage")
    saved = sorted(os.listdir(run / "checkpoints"))
    with pytest.raises(CheckpointError, match="step_000002.*corrupt"):
        train(tiny_config(tiny_llama, str(run), **{"trainer.iterations": 3, "trainer.resume": True}))
    assert sorted(os.listdir(run / "checkpoints")) == saved
    assert (run / "checkpoints" / "step_000001" / "policy.safetensors").exists()


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tiny_llama, tmp_path, monkeypatch):
    import meal.methods.meal as recipe

    real, calls = recipe.policy_step, []

    def nan_on_second(*args, **kwargs):
        calls.append(1)
        loss, grad_norm = real(*args, **kwargs)
        return (float("nan") if len(calls) == 2 else loss), grad_norm

    monkeypatch.setattr(recipe, "policy_step", nan_on_second)
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="step 2: the training loss is nan; the last checkpoint .* intact"):
        train(tiny_config(tiny_llama, str(run), **{"trainer.iterations": 3}))
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_000001"]
    assert _ckpt(str(run), 1)  # readable
    assert [json.loads(x)["step"] for x in open(run / "metrics.jsonl")] == [1]


def test_nan_reward_is_reported_with_its_name(tiny_llama, tmp_path):
    cfg = tiny_config(tiny_llama, str(tmp_path / "run"), **{"task.objectives": ["coverage", "broken"]})
    cfg["rewards"]["broken"] = "tests.test_training.nan_reward"
    with pytest.raises(Exception, match="reward 'broken' returned nan"):
        train(cfg)


def nan_reward(prompts, responses):
    return [float("nan")] * len(responses)


def test_reward_statistics_are_cached_and_shared_across_seeds(tiny_llama, tmp_path):
    """Two runs with different training seeds share one normalisation (the pass has its own seed);
    the second reads it from the cache, and the training RNG stream does not depend on the cache."""
    cache = str(tmp_path / "cache")
    a = tiny_config(tiny_llama, str(tmp_path / "a"), **{"trainer.stats_cache": cache, "trainer.seed": 1})
    b = tiny_config(tiny_llama, str(tmp_path / "b"), **{"trainer.stats_cache": cache, "trainer.seed": 2})
    c = tiny_config(tiny_llama, str(tmp_path / "c"), **{"trainer.stats_cache": None, "trainer.seed": 2})
    for cfg in (a, b, c):
        train(cfg)
    assert len(os.listdir(cache)) == 1
    stats = [json.load(open(tmp_path / r / "reward_stats.json")) for r in "abc"]
    assert stats[0]["mean"] == stats[1]["mean"] == stats[2]["mean"]
    lb = [json.loads(x)["train/loss"] for x in open(tmp_path / "b" / "metrics.jsonl")]
    lc = [json.loads(x)["train/loss"] for x in open(tmp_path / "c" / "metrics.jsonl")]
    assert lb == lc


def test_meta_objective_advantage_trains_the_net(tiny_llama, tmp_path):
    """meta_objective=advantage (every sample weighted by its group-normalised target score) runs and
    gives the net a gradient."""
    train(tiny_config(tiny_llama, str(tmp_path / "run"), **{"method.meta_objective": "advantage"}))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(r["meta/grad_norm"] > 0 for r in rows)
