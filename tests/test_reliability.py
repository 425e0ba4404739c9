"""Bad input and interrupted work: a refused launch changes nothing, and each mistake is named in one line."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import tiny_config

from meal.config import ConfigError
from meal.harness.checkpoint import CheckpointError, save_checkpoint
from meal.methods import train
from meal.rewards import RewardError
from meal.tasks import DataError, load_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    """A finished 2-iteration run (checkpoints at 1 and 2), copied fresh for each test that uses it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(tiny_llama, str(run)))
    return run


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_refused_resume_leaves_the_run_byte_identical(tiny_llama, trained, tmp_path):
    run = _copy(trained, tmp_path / "run")
    before = (run / "config.yaml").read_bytes()
    for over, field in [({"trainer.n_samples": 3}, "trainer.n_samples: 2 -> 3"),
                        ({"policy.lora": {"enabled": True, "r": 4}}, "policy.lora.enabled: False -> True")]:
        cfg = tiny_config(tiny_llama, str(run), **{"trainer.resume": True, "trainer.iterations": 3, **over})
        with pytest.raises(ConfigError, match=field):
            train(cfg)
        assert (run / "config.yaml").read_bytes() == before
    # a change of how long it runs is a resume like any other
    train(tiny_config(tiny_llama, str(run), **{"trainer.resume": True, "trainer.iterations": 3}))
    assert (run / "checkpoints" / "latest").read_text() == "step_000003"


def test_resume_on_a_folder_without_checkpoint_says_so(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="holds no checkpoint to resume"):
        train(tiny_config(tiny_llama, str(tmp_path / "empty"), **{"trainer.resume": True}))
    assert not (tmp_path / "empty" / "config.yaml").exists()


def test_resume_cuts_metrics_back_to_the_checkpoint(tiny_llama, trained, tmp_path):
    """A run killed after logging step 3 but before its checkpoint: the resume redoes step 3 once."""
    run = _copy(trained, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "train/loss": 1.0}) + "\n" + '{"step": 4, "train/lo')  # a torn last line
    train(tiny_config(tiny_llama, str(run), **{"trainer.resume": True, "trainer.iterations": 4}))
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]


def test_a_typo_fails_naming_the_nearest_field():
    from hydra import compose, initialize_config_dir

    from meal.config import register_configs
    from meal.methods import typed_config

    register_configs()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+trainer.iteratons=3"])
    with pytest.raises(ConfigError, match="trainer.iteratons: unknown setting; did you mean trainer.iterations"):
        typed_config(cfg)


@pytest.mark.parametrize("over,msg", [
    ({"trainer.batch_size": 2, "trainer.micro_batch_size": 2}, "trainer.batch_size: Meal splits each batch"),
    ({"method.lam": 1.0}, "method.lam: with lambda = 1 the preference-weight-net never receives a gradient"),
    ({"method.meta_learner": False, "method.lam": 0.5}, "method.lam: lambda = 0.5 needs the preference-weight-net"),
])
def test_a_net_that_cannot_learn_fails_validation(tmp_path, over, msg):
    with pytest.raises(ConfigError, match=msg):
        train(tiny_config(str(tmp_path / "no-model"), str(tmp_path / "run"), **over))


def test_batch_of_four_gives_the_net_a_gradient(tiny_llama, tmp_path):
    """The smallest batch validation accepts (4: two inner prompts) does train the net."""
    train(tiny_config(tiny_llama, str(tmp_path / "run"), **{"trainer.iterations": 1}))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows[0]["meta/grad_norm"] > 0


def nan_reward(prompts, responses):
    return [float("nan")] * len(responses)


def short_reward(prompts, responses):
    return [0.0]


def test_a_broken_reward_fails_before_the_policy_loads(tiny_llama, tmp_path, monkeypatch):
    import meal.policy.model

    def no_policy(*a, **k):
        raise AssertionError("the policy was loaded")

    monkeypatch.setattr(meal.policy.model, "load_policy", no_policy)
    for fn, msg in [("nan_reward", "reward 'broken' returned nan"), ("short_reward", "returned 1 values for 2")]:
        cfg = tiny_config(tiny_llama, str(tmp_path / fn), **{"task.objectives": ["coverage", "broken"]})
        cfg["rewards"]["broken"] = f"tests.test_reliability.{fn}"
        with pytest.raises(RewardError, match=msg):
            train(cfg)
    cfg = tiny_config(tiny_llama, str(tmp_path / "imp"), **{"task.objectives": ["coverage", "broken"]})
    cfg["rewards"]["broken"] = "nowhere.module.fn"
    with pytest.raises(RewardError, match="cannot import reward 'nowhere.module.fn'"):
        train(cfg)


def test_a_missing_policy_is_named(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="policy.name_or_path: no folder"):
        train(tiny_config(str(tmp_path / "no-model-here"), str(tmp_path / "r1")))
    with pytest.raises(ConfigError, match="policy.gguf_file: .* has no 'SmolLM2.gguf'"):
        train(tiny_config(tiny_llama, str(tmp_path / "r2"), **{"policy.gguf_file": "SmolLM2.gguf"}))


def test_every_faulty_jsonl_row_is_reported_at_once(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n{"text": "fine"}\n{"prompt": "x"}\n["list"]\n{"text": "good"}\n')
    with pytest.raises(DataError) as err:
        load_jsonl(str(bad))
    msg = str(err.value)
    assert "3 faulty row(s)" in msg
    assert "line 2: not valid JSON" in msg and "line 4: field 'text'" in msg and "line 5: expected a JSON object" in msg
    assert "set task.data.text_key" in msg


def test_a_data_error_is_not_wrapped(tiny_llama, tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "a"}\n{"text": 3}\n')
    cfg = tiny_config(tiny_llama, str(tmp_path / "run"), **{"task.data": {"_target_": "meal.tasks.load_jsonl",
                                                                          "train_file": str(bad)}})
    with pytest.raises(DataError, match=r"p.jsonl: 1 faulty row\(s\): line 2"):
        train(cfg)


def test_checkpoint_leftovers_and_a_corrupt_latest(tiny_llama, trained, tmp_path):
    import torch

    run = _copy(trained, tmp_path / "run")
    root = run / "checkpoints"
    (root / ".step_000003.dead").mkdir()  # a write killed half-way
    (root / ".step_000003.dead" / "policy.safetensors").write_bytes(b"partial")
    save_checkpoint(str(run), 3, {"w": torch.zeros(2)}, None, {}, keep=5)
    assert not any(d.startswith(".step_") for d in os.listdir(root))

    run2 = _copy(trained, tmp_path / "run2")
    (run2 / "checkpoints" / "step_000002" / "state.pt").write_bytes(b"garbage")
    resume = {"trainer.resume": True, "trainer.iterations": 3}
    with pytest.raises(CheckpointError, match="step_000002 is corrupt.*trainer.resume_from=step_000001"):
        train(tiny_config(tiny_llama, str(run2), **resume))
    train(tiny_config(tiny_llama, str(run2), **resume, **{"trainer.resume_from": "step_000001"}))
    assert (run2 / "checkpoints" / "latest").read_text() == "step_000003"
    steps = [json.loads(line)["step"] for line in open(run2 / "metrics.jsonl")]
    assert steps == [1, 2, 3]


def test_cli_prints_one_line_for_bad_data(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": 3}\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", "meal.cli.train", "task=jsonl", f"task.data.train_file={bad}",
                           f"trainer.out_dir={tmp_path / 'run'}", "logger=none"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "meal: bad data:" in proc.stderr and "line 1: field 'text'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("over,msg", [
    ({"trainer.final_eval_split": "dev"}, "trainer.final_eval_split: test | validation, got 'dev'"),
    ({"trainer.final_eval_split": "validation", "task.validation_prompts": 0},
     r"trainer.final_eval_split: validation needs validation prompts \(task.validation_prompts > 0\)"),
    ({"method.control": "random"}, "method.control: none | frozen | uniform | shuffled, got 'random'"),
])
def test_a_bad_split_or_control_is_named_before_any_model_loads(tmp_path, over, msg):
    with pytest.raises(ConfigError, match=msg):
        train(tiny_config(str(tmp_path / "no-model"), str(tmp_path / "run"), **over))
    assert not os.path.exists(tmp_path / "run")


def test_meal_eval_names_a_bad_split_before_loading_anything(tmp_path):
    from meal.harness.saved_run import EvalOptions, evaluate_run

    with pytest.raises(ConfigError, match="split: test | validation, got 'dev'"):
        evaluate_run(str(tmp_path / "no-run"), EvalOptions(split="dev"))
