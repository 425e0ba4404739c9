"""meal-generate: a trained run answers prompts under preferences of the user's choice, scored on request,
as a table and JSONL; bad preferences and folders are named before the policy loads; nothing is written
into the run folder."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import tiny_config

from meal.cli.generate import Ask, answer, parse_preferences, table
from meal.config import ConfigError
from meal.methods import train
from meal.rewards import RewardNormalizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA = {"enabled": True, "preference_aware": True, "r": 2, "alpha": 4}


@pytest.fixture(scope="module")
def run(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "run"
    train(tiny_config(tiny_llama, str(out), **{"policy.lora": LORA, "trainer.lr": 1e-2, "method.weight_path": False,
                                               "method.weight_net": {"hidden": 16, "features": 8}}))
    return out


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_answers_per_prompt_and_preference_with_the_runs_scores(run):
    ask = Ask(["Post: my cat knocked a glass off the table.", "Post: rain all week."], [[1.0, 0.0], [0.3, 0.7]],
              greedy=True, score=True, max_new_tokens=6)
    rows = answer(str(run), ask)
    assert [(r["prompt"][:9], r["preference"]["coverage"]) for r in rows] == [
        ("Post: my ", 1.0), ("Post: my ", 0.3), ("Post: rai", 1.0), ("Post: rai", 0.3)]  # prompt-major
    norm = RewardNormalizer.load(str(run / "reward_stats.json"), ["coverage", "concise"])
    for r in rows:
        assert isinstance(r["response"], str) and isinstance(r["finished"], bool)
        raw = torch.tensor([[r["raw"]["coverage"], r["raw"]["concise"]]])
        assert torch.allclose(norm(raw)[0], torch.tensor([r["normalised"]["coverage"], r["normalised"]["concise"]]))
    assert answer(str(run), ask) == rows  # greedy: the same answers every time
    half = answer(str(run), Ask(ask.prompts, [[1.0, 0.0]], greedy=True, max_new_tokens=6, dtype="bfloat16"))
    assert [r["prompt"] for r in half] == ask.prompts  # the policy loaded in another dtype than the run's
    with pytest.raises(ConfigError, match="dtype: auto \\| float32 \\| bfloat16 \\| float16, got 'fp8'"):
        answer(str(run), Ask(ask.prompts, [[1.0, 0.0]], dtype="fp8"))
    shown = table(rows)
    assert shown.count("\n> ") == 2 and "[coverage 0.30 concise 0.70] | coverage " in shown


@pytest.mark.parametrize("value,msg", [
    ([0.5, 0.6], r"preference: \[0.5, 0.6\] is not on the simplex"),
    ([1.0], r"preference: \[1.0\] has 1 weight\(s\) for 2 objectives \(coverage, concise\)"),
    ([[1, 0], [-0.5, 1.5]], r"preference: \[-0.5, 1.5\] is not on the simplex"),
    ("half", "preference: give"),
])
def test_a_bad_preference_is_named(value, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_preferences(value, ["coverage", "concise"])
    assert parse_preferences("grid", ["coverage", "concise"])[3] == [0.3, 0.7]


def test_a_folder_without_a_checkpoint_is_named(tmp_path):
    (tmp_path / "config.yaml").write_text("trainer: {seed: 0}\n")
    with pytest.raises(ConfigError, match="has no checkpoint 'latest'"):
        answer(str(tmp_path), Ask(["hi"], [[1.0, 0.0]]))


def test_cli_sweeps_the_grid_writes_jsonl_and_leaves_the_run_folder_alone(run, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    env.pop("HYDRA_FULL_ERROR", None)
    before = _files(run)
    out = tmp_path / "answers.jsonl"
    proc = subprocess.run([sys.executable, "-m", "meal.cli.generate", f"run_dir={run}", "preference=grid",
                           "prompt=Post: the bus was late again.", "max_new_tokens=4", f"out={out}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("  [coverage ") == 11 and "[coverage 0.00 concise 1.00]" in proc.stdout
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == 11 and rows[-1]["preference"] == {"coverage": 1.0, "concise": 0.0}
    assert _files(run) == before and not os.path.exists(tmp_path / "outputs")
    bad = subprocess.run([sys.executable, "-m", "meal.cli.generate", f"run_dir={run}", "preference=[0.5,0.6]",
                          "prompt=x"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "meal: invalid configuration: preference: [0.5, 0.6] is not on the simplex" in bad.stderr
