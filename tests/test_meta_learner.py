"""Meal's meta-learner end to end on the tiny model: the default (label path, preference-aware LoRA)
moves the net and reports it; each control does what its name says; bad settings are named."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config

from meal.config import ConfigError
from meal.harness.saved_run import EvalOptions, evaluate_run
from meal.methods import train
from meal.methods.meta_learner import DIAGNOSTIC_KEYS, Kept, MetaSettings, NetLearner, NetShape, build_learner

LORA = {"enabled": True, "preference_aware": True, "r": 2, "alpha": 4}


def _meal(tiny_llama, out, **over):
    base = {"policy.lora": LORA, "method.weight_path": False, "method.label_path": True, "trainer.iterations": 3,
            "trainer.lr": 1e-2, "method.weight_net": {"lr": 1e-2, "hidden": 16, "features": 8}}
    base.update(over)
    return tiny_config(tiny_llama, out, **base)


def _rows(run):
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl")) if '"train/loss"' in line]


def _net(run, step):
    return load_file(os.path.join(run, "checkpoints", f"step_{step:06d}", "net.safetensors"))


def test_default_meal_moves_its_net_by_the_label_path_and_reports_it(tiny_llama, tmp_path):
    """method.md steps 2, 5-9 as configured by default: the net receives a meta-gradient through the labels
    alone (no sample-weight path), its distance from the initialisation grows, its proposal comes to depend
    on the prompt (spread over the training prompts at a fixed w* > 0), and the front records what it did."""
    run = str(tmp_path / "run")
    train(_meal(tiny_llama, run, **{"trainer.final_eval": True, "trainer.final_eval_prompts": 2}))
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["meta/grad_norm"] > 0 for r in rows)
    dist = [r["meta/param_distance"] for r in rows]
    assert 0 < dist[0] < dist[-1]
    assert "meta/grad_cosine" in rows[1] and -1 <= rows[1]["meta/grad_cosine"] <= 1
    assert rows[-1]["meta/w_phi_spread_range"] > 0 and rows[-1]["meta/h_phi_spread_range"] > 0
    assert all(r["meta/label_shift"] > 0 for r in rows)
    front = json.load(open(os.path.join(run, "front.json")))
    assert len(front["points"]) == 11 and front["extra"]["split"] == "test"
    assert front["extra"]["meta_learner"]["meta/param_distance"] == pytest.approx(dist[-1])
    assert set(front["extra"]["meta_learner"]) == set(DIAGNOSTIC_KEYS)
    # meal-eval's front of any checkpoint carries what the net had done by then (another split, no retraining)
    options = EvalOptions(checkpoint="step_000002", prompts=1, split="validation")
    again = json.load(open(evaluate_run(run, options)["front_json"]))
    assert again["extra"]["split"] == "validation"
    assert again["extra"]["meta_learner"]["meta/param_distance"] == pytest.approx(dist[1])
    # every net parameter moved between the last two checkpoints
    first, last = _net(run, 2), _net(run, 3)
    assert all(not torch.equal(first[n], last[n]) for n in first)


def test_frozen_control_keeps_the_net_at_its_initialisation(tiny_llama, tmp_path):
    """control=frozen: lam < 1 with the net never updated: no meta step, distance 0, w_phi = w*."""
    run = str(tmp_path / "run")
    train(_meal(tiny_llama, run, **{"method.control": "frozen", "trainer.iterations": 2, "trainer.eval_every": 1,
                                    "trainer.eval_prompts": 2}))
    curve = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl")) if '"val/hypervolume"' in line]
    assert [r["step"] for r in curve] == [1, 2]  # the learning curve on validation prompts, its last point too
    rows = _rows(run)
    assert all("meta/loss" not in r and r["meta/param_distance"] == 0 for r in rows)
    assert all(r["weights/dist_to_target"] < 1e-4 for r in rows)  # w_phi = w* (up to the log floor)
    torch.testing.assert_close(_net(run, 1), _net(run, 2), rtol=0, atol=0)


def test_uniform_control_builds_no_net_and_samples_halfway_to_uniform(tiny_llama, tmp_path):
    """control=uniform: no net, no embeddings, w_phi = (1/K, ...): the proposal is uniform for every prompt."""
    run = str(tmp_path / "run")
    train(_meal(tiny_llama, run, **{"method.control": "uniform", "trainer.iterations": 2}))
    rows = _rows(run)
    assert all(r["weights/coverage"] == pytest.approx(0.5) and r["weights/coverage_std"] == 0 for r in rows)
    assert not os.path.exists(os.path.join(run, "checkpoints", "step_000002", "net.safetensors"))


def test_shuffled_control_permutes_the_learned_residuals_across_the_batch():
    """control=shuffled: the net learns as Meal's, but what the policy sees for prompt i is the residual the
    net computed for another prompt of the batch (on top of prompt i's own w*)."""
    torch.manual_seed(0)
    emb = torch.randn(10, 6)
    s = MetaSettings(lam=0.5, tau=1.0, alpha_in=1e-3, control="shuffled", seed=5)
    learner = build_learner(s, 2, emb, NetShape(hidden=8, features=4, lr=1e-2, adam_eps=1e-16), init_seed=0)
    assert isinstance(learner, NetLearner)
    with torch.no_grad():
        learner.net.proposal[2].weight.normal_()
    idx, w_star = [0, 1, 2, 3], torch.full((4, 2), 0.5)
    learner.begin(0, 4)
    perm = learner.perm
    assert sorted(perm.tolist()) == [0, 1, 2, 3] and perm.tolist() != [0, 1, 2, 3]
    shuffled = learner.propose(idx, w_star)
    learner.perm = None
    plain = learner.propose(idx, w_star)
    torch.testing.assert_close(shuffled, plain[perm])  # one w*, so permuting the residual permutes the output
    kept = Kept(torch.tensor([0, 1, 2, 3]), torch.randn(4, 2), torch.ones(4, dtype=torch.bool), torch.zeros(4).long())
    learner.perm = perm
    labels = learner.labels(idx, w_star, kept)
    assert labels.shape == (4, 2) and torch.allclose(labels.sum(-1), torch.ones(4))


def test_a_net_with_no_gradient_path_is_refused(tiny_llama, tmp_path):
    """Full fine-tuning writes the preference as text only: the label path carries nothing there, so Meal
    without the weight path would train a net that never moves."""
    cfg = tiny_config(tiny_llama, str(tmp_path / "run"), **{"method.weight_path": False})
    with pytest.raises(ConfigError, match="method.label_path: no path carries the meta-gradient"):
        train(cfg)
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")
