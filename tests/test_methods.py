"""The method recipes over the shared harness: RiC's pieces on hand-made numbers, RiC end to end on the
tiny model, and method configs that contradict themselves."""

import json
import os

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config

from meal.config import ConfigError
from meal.methods import train
from meal.methods.ric import ScoreRange, quantile_filter
from meal.policy.templates import format_scores


def test_ric_quantile_filter_keeps_a_sample_when_any_objective_reaches_its_threshold():
    rewards = torch.tensor([[[1.0, -1.0], [-1.0, 2.0]], [[0.0, 0.0], [0.5, 0.9]]])  # (B=2, N=2, K=2)
    keep = quantile_filter(rewards, torch.tensor([0.5, 1.0]))
    assert keep.tolist() == [[True, True], [False, True]]
    # the 0.7 quantile of four values 0, 1, 2, 3 per objective is 2.1: only the 3 passes
    x = torch.tensor([[0.0, 3.0], [1.0, 2.0], [2.0, 1.0], [3.0, 0.0]])
    assert torch.allclose(torch.quantile(x, 0.7, dim=0), torch.tensor([2.1, 2.1]))
    assert quantile_filter(x, torch.quantile(x, 0.7, dim=0)).tolist() == [True, False, False, True]


def test_ric_maps_a_preference_to_desired_scores_as_its_reference_code():
    rng = ScoreRange(-4.0, 4.0)
    out = rng.from_preference(torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]))
    half = float(0.5 / np.sqrt(0.5) * 8 - 4)  # w / ||w||_2 * (hi - lo) + lo
    assert torch.allclose(out, torch.tensor([[4.0, -4.0], [half, half], [-4.0, 4.0]]))
    drawn = ScoreRange.from_draws(50000)
    assert -5 < drawn.lo < -3.5 and 3.5 < drawn.hi < 5  # the extremes of 50,000 N(0, 1) draws
    targets = rng.online_targets(200, 3, np.random.default_rng(0))
    assert ((targets == 4.0).sum(1) >= 2).all()  # one objective drawn, the others at the maximum
    assert ((targets >= -4.0) & (targets <= 4.0)).all()


def test_scores_are_written_with_one_decimal():
    assert format_scores([1.26, -0.44], ["helpful", "concise"]) == "helpful 1.3, concise -0.4"


def _ric_config(tiny_llama, out, cache, **over):
    base = {"method": {"recipe": "ric", "name": "ric"}, "conditioning.enabled": True, "conditioning.label": "scores",
            "conditioning.steps": 3, "conditioning.batch_size": 4, "conditioning.micro_batch_size": 2,
            "conditioning.pool_prompts": 4, "conditioning.cache": cache, "task.pool_instructions": ["", "Be brief."],
            "policy.lora": {"enabled": True, "r": 2, "alpha": 4}, "trainer.iterations": 2,
            "trainer.n_samples": 4, "trainer.final_eval": True, "trainer.final_eval_prompts": 2}
    base.update(over)
    cfg = tiny_config(tiny_llama, out, **{k: v for k, v in base.items() if k != "method"})
    cfg["method"] = base["method"]
    return cfg


def test_ric_trains_two_steps_and_writes_its_front(tiny_llama, tmp_path):
    """The offline stage labels every corpus row with its own scores; two MORS iterations keep the samples
    past the 0.7 quantile (plus as many filtered corpus rows), step, and the front is evaluated through
    RiC's map from preferences to desired scores."""
    from meal.harness.corpus import ReplaySet

    out = tmp_path / "ric"
    summary = train(_ric_config(tiny_llama, str(out), str(tmp_path / "cache")))
    rows = [json.loads(x) for x in open(out / "metrics.jsonl") if "train/loss" in x]
    assert len(rows) == 2
    for r in rows:
        assert 1 <= r["train/kept"] <= 16  # 4 prompts x 4 samples, any objective past its 0.7 quantile
        assert r["train/replay_rows"] in (0.0, r["train/kept"])
    corpus = ReplaySet.load(str(out / "conditioning" / "replay.jsonl"))
    assert len(corpus) == 8  # every pool row, labelled with its own normalised rewards
    front = json.load(open(out / "front.json"))
    assert len(front["points"]) == 11 and front["label"] == "ric"
    assert summary["budget"]["steps"] == sum(r["train/loss"] > 0 for r in rows)
    assert os.path.exists(out / "checkpoints" / "step_000002" / "state.pt")
    from safetensors.torch import load_file

    start = load_file(str(out / "conditioning" / "policy.safetensors"))  # the offline stage's policy
    trained = load_file(str(out / "checkpoints" / "step_000002" / "policy.safetensors"))
    assert start.keys() == trained.keys() and any(not torch.equal(start[n], trained[n]) for n in start)
    # meal-export: the model, with the desired scores RiC's map gives at w written into its prompt template
    from tests.test_export import assert_export_answers_as_the_run

    assert_export_answers_as_the_run(out, [0.6, 0.4], tmp_path / "exported")
    prompt = json.load(open(tmp_path / "exported" / "meal_prompt.json"))
    from meal.methods.ric import ScoreRange

    scores = ScoreRange.from_draws(50_000).from_preference(torch.tensor([[0.6, 0.4]]))[0]
    assert prompt["written"] == f"coverage {scores[0]:.1f}, concise {scores[1]:.1f}" and "{text}" in prompt["user"]


@pytest.mark.parametrize("over, msg", [
    ({"policy.lora": {"enabled": True, "preference_aware": True}}, "policy.lora.preference_aware"),
    ({"conditioning.label": "region"}, "conditioning.label"),
    ({"method": {"recipe": "ric", "quantile": 1.5}}, "method.quantile"),
    ({"method": {"recipe": "ric", "quantil": 0.5}}, "did you mean method.quantile"),
    ({"method": {"recipe": "rice"}}, "method.recipe: unknown recipe 'rice'"),
    ({"method": {"recipe": "ric", "lam": 0.5}}, "method.lam: unknown setting"),
])
def test_a_method_config_that_contradicts_itself_names_the_field(tiny_llama, tmp_path, over, msg):
    with pytest.raises(ConfigError, match=msg):
        train(_ric_config(tiny_llama, str(tmp_path / "r"), str(tmp_path / "c"), **over))


def test_morlhf_reward_functions_give_w_dot_r_on_hand_made_scores():
    """TRL sums reward_weights[k] * reward_k: with MORLHF's reward functions that is w . R of the normalised
    rewards, and the reward set is scored once for all K functions."""
    from meal.harness.budget import Budget
    from meal.methods.grpo import ScoreCache
    from meal.policy.rollout import Scoring
    from meal.rewards import RewardNormalizer

    calls = []

    class Fixed:
        objectives = ["a", "b"]

        def score(self, prompts, responses):
            calls.append(len(responses))
            return torch.tensor([[1.0, 4.0], [3.0, 0.0]])

    def tokenizer(text, add_special_tokens=False):
        return {"input_ids": text.split()}

    budget = Budget()
    normalizer = RewardNormalizer(mean=[1.0, 2.0], std=[2.0, 2.0], objectives=["a", "b"])
    cache = ScoreCache(Scoring(Fixed(), normalizer), tokenizer, budget)
    fa, fb = cache.reward_function(0, "a"), cache.reward_function(1, "b")
    w = [0.25, 0.75]
    ra = fa(prompts=["p", "q"], completions=["x y", "z"], text=["t", "u"])
    rb = fb(prompts=["p", "q"], completions=["x y", "z"], text=["t", "u"])
    assert ra == [0.0, 1.0] and rb == [1.0, -1.0]  # (raw - mean) / std
    assert [w[0] * x + w[1] * y for x, y in zip(ra, rb)] == [0.75, -0.5]
    assert calls == [2]  # one scoring pass for both reward functions
    assert budget.responses == 2 and budget.tokens == 3 and budget.reward_calls == 4


def test_morlhf_trains_one_grpo_policy_per_preference_and_evaluates_each_at_its_own(tiny_llama, tmp_path):
    out = tmp_path / "morlhf"
    cfg = tiny_config(tiny_llama, str(out), **{
        "conditioning.enabled": True, "conditioning.steps": 2, "conditioning.batch_size": 4,
        "conditioning.micro_batch_size": 2, "conditioning.pool_prompts": 4, "conditioning.cache": str(tmp_path / "c"),
        "task.pool_instructions": ["", "Be brief."],
        "policy.lora": {"enabled": True, "preference_aware": True, "r": 2, "alpha": 4},
        "trainer.iterations": 2, "trainer.batch_size": 2, "trainer.n_samples": 2, "trainer.final_eval": True,
        "trainer.final_eval_prompts": 2})
    cfg["method"] = {"recipe": "morlhf", "name": "morlhf", "grid_points": 2}
    summary = train(cfg)
    from safetensors.torch import load_file

    start = load_file(str(out / "policies" / "start.safetensors"))
    p0, p1 = (load_file(str(out / "policies" / f"{i:02d}.safetensors")) for i in (0, 1))
    assert any(not torch.equal(p0[n], start[n]) for n in start)  # GRPO moved each policy ...
    assert any(not torch.equal(p0[n], p1[n]) for n in start)  # ... differently for each preference
    front = json.load(open(out / "front.json"))
    assert front["preferences"] == [[0.0, 1.0], [1.0, 0.0]] and front["label"] == "morlhf"
    assert summary["budget"]["responses"] == 2 * 2 * 2 * 2  # 2 policies x 2 steps x 2 prompts x 2 completions
    assert summary["budget"]["steps"] == 4
    # meal-export: the policy trained at a grid preference; a preference it has no policy for is refused
    from tests.test_export import assert_export_answers_as_the_run

    assert_export_answers_as_the_run(out, [1.0, 0.0], tmp_path / "exported")
    from meal.cli.export import export_run

    with pytest.raises(ConfigError, match=r"preference: \[0.5, 0.5\] is not one of this morlhf run's policies"):
        export_run(str(out), [0.5, 0.5], str(tmp_path / "other"))


def test_soup_of_two_adapters_is_the_first_at_one_zero_and_their_average_at_one_half():
    from meal.methods.soups import interpolate

    a = {"x.lora_A": torch.tensor([[1.0, 2.0]]), "x.lora_B": torch.tensor([[4.0]])}
    b = {"x.lora_A": torch.tensor([[3.0, -2.0]]), "x.lora_B": torch.tensor([[0.0]])}
    first = interpolate([a, b], [1.0, 0.0])
    assert all(torch.equal(first[n], a[n]) for n in a)
    half = interpolate([a, b], [0.5, 0.5])
    assert torch.equal(half["x.lora_A"], torch.tensor([[2.0, 0.0]])) and torch.equal(half["x.lora_B"],
                                                                                      torch.tensor([[2.0]]))


def test_merged_soup_interpolates_full_weight_updates_and_restores_the_base(tiny_llama):
    """The merged rule: at (1, 0) each adapted layer carries expert 1's full update, at (0.5, 0.5) the mean
    of both (not the update of the mean adapters); the base weights come back bit for bit."""
    from omegaconf import OmegaConf

    from meal.config import PolicyConfig
    from meal.methods.soups import Soup, layer_deltas
    from meal.policy.model import load_policy, trainable_parameters
    from meal.policy.rollout import ConditionedPolicy

    cfg = OmegaConf.merge(OmegaConf.structured(PolicyConfig), {"name_or_path": tiny_llama, "dtype": "float32",
                          "lora": {"enabled": True, "preference_aware": True, "r": 2, "alpha": 4}})
    model, tok = load_policy(cfg, 2, device="cpu")
    params = trainable_parameters(model)
    g = torch.Generator().manual_seed(0)
    experts = [{n: torch.randn(p.shape, generator=g) * 0.1 for n, p in params.items()} for _ in range(2)]
    w = torch.tensor([0.3, 0.7])
    deltas = []
    for e in experts:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(e[n])
        deltas.append(layer_deltas(model, w))
    soup = Soup(ConditionedPolicy(model, None), params, experts, "merged")
    name = next(iter(deltas[0]))
    base = model.get_submodule(name).base
    before = base.weight.detach().clone()
    with soup.merged(w):
        torch.testing.assert_close(base.weight - before, 0.3 * deltas[0][name] + 0.7 * deltas[1][name])
    assert torch.equal(base.weight, before)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(experts[0][n])
    first = layer_deltas(model, torch.tensor([1.0, 0.0]))[name]  # expert 1's update at its own preference
    with soup.merged(torch.tensor([1.0, 0.0])):
        torch.testing.assert_close(base.weight - before, first)


def test_soups_train_one_expert_per_objective_and_evaluate_the_whole_grid(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "soups"
    cfg = tiny_config(tiny_llama, str(out), **{
        "conditioning.enabled": True, "conditioning.steps": 2, "conditioning.batch_size": 4,
        "conditioning.micro_batch_size": 2, "conditioning.pool_prompts": 4, "conditioning.cache": str(tmp_path / "c"),
        "task.pool_instructions": ["", "Be brief."],
        "policy.lora": {"enabled": True, "preference_aware": True, "r": 2, "alpha": 4},
        "trainer.iterations": 1, "trainer.batch_size": 2, "trainer.n_samples": 4, "trainer.final_eval": True,
        "trainer.final_eval_prompts": 2})
    # ROUGE coverage ties on the tiny model's random tokens (no gradient for the expert at w = (1, 0)): harmlessness
    cfg["task"]["objectives"] = ["harmless", "concise"]
    cfg["rewards"] = {"harmless": {"_target_": "meal.rewards.embedded.ProfanityHarmlessness"},
                      "concise": cfg["rewards"]["concise"]}
    cfg["method"] = {"recipe": "soups", "name": "soups"}
    summary = train(cfg)
    assert sorted(os.listdir(out / "policies")) == ["00.safetensors", "01.safetensors", "start.safetensors"]
    from safetensors.torch import load_file

    start, e0, e1 = (load_file(str(out / "policies" / f)) for f in ("start.safetensors", "00.safetensors",
                                                                    "01.safetensors"))
    assert any(not torch.equal(e0[n], start[n]) for n in start) and any(not torch.equal(e1[n], start[n]) for n in start)
    front = json.load(open(out / "front.json"))
    assert len(front["points"]) == 11 and front["label"] == "soups"
    assert summary["budget"]["responses"] == 2 * 1 * 2 * 4
    from tests.test_export import assert_export_answers_as_the_run

    assert_export_answers_as_the_run(out, [0.3, 0.7], tmp_path / "exported")  # meal-export: the soup at w


    # meal-eval at the run's start (conditioned or base weights) asks the start, not the soup of its experts
    from meal.harness.saved_run import EvalOptions, evaluate_run
    from meal.methods.soups import Soup

    def refuse(*a, **k):
        raise AssertionError("the soup answered for the start")

    monkeypatch.setattr(Soup, "respond", refuse)
    for kw in ({"checkpoint": "conditioned"}, {"untrained": True}):
        start = json.load(open(evaluate_run(str(out), EvalOptions(prompts=1, **kw))["front_json"]))
        assert len(start["points"]) == 11 and start["extra"]["budget"]["responses"] == 0


PORTS = {"morlhf": "29537", "soups": "29538", "static,ric": "29539"}  # a port just closed may be held


def _overrides(tiny_llama, out, method, *extra):
    """``method`` on the tiny model: stage of 2 steps, LoRA r 2, 2 iterations of 4 prompts x 2 responses."""
    from tests.test_cli import tiny_overrides

    return [o for o in tiny_overrides(tiny_llama, out) if not o.startswith("method.")] + [
        f"method={method}", "conditioning.steps=2", "policy.lora.enabled=true", "policy.lora.r=2",
        "policy.lora.alpha=4", "trainer.micro_batch_size=2", "task.pool_instructions=['','Be brief.']", *extra]


def _two_processes(tiny_llama, tmp_path, method, *extra, config="multi_gpu.yaml"):
    """``method`` (:func:`_overrides`) under `accelerate launch` with 2 CPU processes (the shipped accelerate
    ``config``); returns its run folder. ``method`` may be a Hydra sweep ("static,ric"): one launch runs each
    method in turn in the same two processes, each in ``<tmp_path>/<method>``."""
    import sys

    from tests.test_cli import _accelerate_config, _launch

    sweep = "," in method
    out = tmp_path / ("${method.name}" if sweep else method)
    common = _overrides(tiny_llama, out, method, *extra)
    if sweep:
        common = ["--multirun", *common, f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
             _accelerate_config(tmp_path, config), "--main_process_port", PORTS[method],
             "-m", "meal.cli.train", *common], tmp_path)
    return out


@pytest.mark.processes
def test_online_methods_under_accelerate_on_two_processes(tiny_llama, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo) for the recipes that shard their own online loop as Meal
    does (Meal's launches: tests/test_cli.py), static then RiC as one Hydra sweep in the same two processes
    (a user's sweep on a multi-GPU node): each process samples, scores and trains on its half of every
    batch; rank 0 writes; the processes' weights are checked identical at every checkpoint (the launch fails
    otherwise); the budget counts both processes' responses (2 iterations x 4 prompts x 2). Each response is
    seeded by its prompt (``trainer.seeding=row``), so two processes draw what one draws, and both recipes
    train the single process's weights: static's shares are equal; RiC's quantile is taken over every
    process's samples, its replayed rows drawn for the whole batch, and its step averages over every kept
    row, however many each process kept. (Meal's launches, against one process too: tests/test_cli.py.)"""
    from safetensors.torch import load_file

    from tests.test_config import _compose

    from meal.methods import train

    # ROUGE coverage ties on random tokens, and so does brevity on 6 tokens of the tiny tokenizer (a word or two):
    # every sample would pass
    varies = ["task.objectives=[harmless,concise]", "task.max_new_tokens=12"]
    _two_processes(tiny_llama, tmp_path, "static,ric", *varies)
    for method in ("static", "ric"):
        out = tmp_path / method
        rows = [json.loads(x) for x in open(out / "metrics.jsonl") if "train/loss" in x]
        assert [r["step"] for r in rows] == [1, 2]  # one writer
        front = json.load(open(out / "front.json"))
        assert front["label"] == method
        assert front["extra"]["budget"]["responses"] == 2 * 4 * 2 and front["extra"]["budget"]["steps"] == 2
        assert len(front["points"]) == 11
        start = load_file(str(out / "conditioning" / "policy.safetensors"))
        trained = load_file(str(out / "checkpoints" / "step_000002" / "policy.safetensors"))
        assert any(not torch.equal(start[n], trained[n]) for n in start)
    same = {"static": ("reward/concise", "reward_norm/concise", "reward_kept/concise", "train/scalarised"),
            "ric": ("reward/concise", "reward_norm/concise", "train/kept", "train/replay_rows",
                    "ric/threshold/harmless", "ric/threshold/concise")}
    for method, keys in same.items():  # in one process, here: it trains what the two trained
        one = tmp_path / f"one_{method}"
        train(_compose(_overrides(tiny_llama, one, method, *varies, "trainer.final_eval=false")))
        two_rows = [json.loads(x) for x in open(tmp_path / method / "metrics.jsonl") if "train/loss" in x]
        one_rows = [json.loads(x) for x in open(one / "metrics.jsonl") if "train/loss" in x]
        for a, b in zip(one_rows, two_rows, strict=True):
            assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4), method
            assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-3), method
            for key in keys:  # the global batch's, not rank 0's
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (method, key)
        if method == "ric":  # the filter kept some and not all, and the step trained on replayed rows too
            assert all(0 < r["train/kept"] < 4 * 2 and r["train/replay_rows"] > 0 for r in one_rows), one_rows
        two = load_file(str(tmp_path / method / "checkpoints" / "step_000002" / "policy.safetensors"))
        single = load_file(str(one / "checkpoints" / "step_000002" / "policy.safetensors"))
        for n in single:
            torch.testing.assert_close(two[n], single[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{method} {n}: {m}")


@pytest.mark.processes
@pytest.mark.parametrize("method,config", [("morlhf", "deepspeed_zero2.yaml"), ("soups", "multi_gpu.yaml")])
def test_grpo_methods_under_accelerate_on_two_processes(tiny_llama, tmp_path, method, config):
    """`accelerate launch` with 2 CPU processes (gloo): TRL's GRPO trainer takes the launch's process group
    and shards each step's completions (half a step's per process, gradients averaged by its DDP, or by
    DeepSpeed ZeRO-2 under the shipped DeepSpeed config: MORLHF's launch here); rank 0
    writes the policies, the metrics and the front; at every checkpoint the processes' weights are checked
    identical (the launch fails otherwise). The work is counted over both processes (the same responses and
    steps as one process does, test_morlhf_... and test_soups_... above). Each completion is drawn by meal's
    sampler with its own seed (``trainer.seeding=row``: TRL's rollout_func), so the two processes train the
    single process's policies (GRPO's losses and every weight within 1e-4)."""
    from safetensors.torch import load_file

    from tests.test_config import _compose

    from meal.methods import train

    if config.startswith("deepspeed"):
        pytest.importorskip("deepspeed")  # in the dev extra
    extra = ["policy.lora.preference_aware=true", "trainer.iterations=2", "trainer.batch_size=2", "trainer.n_samples=2",
             "task.objectives=[harmless,concise]",  # ROUGE coverage ties on random tokens: no gradient at w = (1, 0)
             *(["method.grid_points=2"] if method == "morlhf" else [])]
    out = _two_processes(tiny_llama, tmp_path, method, *extra, config=config)
    assert not (tmp_path / "torch_extensions").exists()  # TRL's DeepSpeed engine compiled nothing either
    rows = [json.loads(x) for x in open(out / "metrics.jsonl") if "grpo/loss" in x]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and {r["grpo/processes"] for r in rows} == {2}  # one writer
    assert {r["grpo/zero_stage"] for r in rows} == {2 if config.startswith("deepspeed") else 0}
    front = json.load(open(out / "front.json"))
    assert front["extra"]["budget"]["responses"] == 2 * 2 * 2 * 2  # 2 policies x 2 steps x 2 prompts x 2 completions
    assert front["extra"]["budget"]["steps"] == 4
    assert len(front["points"]) == (2 if method == "morlhf" else 11)
    start, p0, p1 = (load_file(str(out / "policies" / f"{n}.safetensors")) for n in ("start", "00", "01"))
    # GRPO moved both policies, each by its own preference
    assert any(not torch.equal(p0[n], start[n]) for n in start) and any(not torch.equal(p1[n], start[n]) for n in start)
    assert any(not torch.equal(p0[n], p1[n]) for n in start)
    one = tmp_path / "one_process"  # the same in one process, here
    train(_compose(_overrides(tiny_llama, one, method, *extra, "trainer.final_eval=false")))
    one_rows = [json.loads(x) for x in open(one / "metrics.jsonl") if "grpo/loss" in x]
    for a, b in zip(one_rows, rows, strict=True):
        assert b["grpo/loss"] == pytest.approx(a["grpo/loss"], rel=1e-4, abs=1e-7)
        assert b["grpo/reward"] == pytest.approx(a["grpo/reward"], rel=1e-4, abs=1e-6)  # the same completions
    for name in ("00", "01"):
        single, two = (load_file(str(d / "policies" / f"{name}.safetensors")) for d in (one, out))
        for n in single:
            torch.testing.assert_close(two[n], single[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name} {n}: {m}")
