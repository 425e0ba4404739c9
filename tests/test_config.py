"""Configs: every experiment composes; invalid values fail before any model loads, naming the field."""

import glob
import os

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from tests.conftest import tiny_config

from meal.config import ConfigError, register_configs
from meal.methods import train, typed_config

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def _compose(overrides):
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("exp", sorted(os.path.splitext(os.path.basename(p))[0]
                                       for p in glob.glob(os.path.join(CONF, "experiment", "*.yaml"))))
def test_every_experiment_composes_and_validates(exp):
    from meal.methods import BUILTIN

    cfg = typed_config(_compose([f"experiment={exp}"]))  # raises ConfigError naming the field otherwise
    assert cfg.method.recipe in BUILTIN and len(cfg.task.objectives) >= 2
    assert set(cfg.task.objectives) <= set(cfg.rewards) and len(cfg.task.hv_ref) == len(cfg.task.objectives)


@pytest.mark.parametrize("group", ["task", "method", "policy", "logger"])
def test_every_group_option_composes(group):
    for path in glob.glob(os.path.join(CONF, group, "*.yaml")):
        name = os.path.splitext(os.path.basename(path))[0]
        extra = ["task.data.train_file=x.jsonl"] if name == "jsonl" else []
        extra += {"helpful_assistant": ["rewards=hf_assistant"], "reddit_summary": ["rewards=hf_summary"],
                  # plain LoRA writes the preference as text: Meal's default label path needs the adapters to mix
                  # by preference (refused otherwise, tests/test_meta_learner.py)
                  "llama2_7b_lora": ["policy.lora.preference_aware=true"]}.get(name, [])
        cfg = typed_config(_compose([f"{group}={name}"] + extra))  # raises ConfigError naming the field otherwise
        option = yaml.safe_load(open(path))
        option = option.get(group, option)  # a group file may nest its fields under the group's name
        key = {"logger": "_target_", "policy": "name_or_path"}.get(group, "name")
        assert cfg[group][key] == option[key], (group, name)  # this option was composed, not the default


def test_every_yaml_starts_with_a_comment_on_how_to_run_it():
    for path in glob.glob(os.path.join(CONF, "**", "*.yaml"), recursive=True):
        lines = open(path).read().lstrip().splitlines()
        comments = []
        for line in lines:  # the leading comment block
            if not line.startswith("#"):
                break
            comments.append(line)
        commands = ("meal-train", "meal-eval", "meal-generate", "meal-export", "accelerate launch", "make ",
                    "--multirun")
        assert comments and any(c in line for line in comments for c in commands), path  # a command to run it


def test_unknown_task_fails_at_composition():
    with pytest.raises(HydraException, match="nonexistent"):
        _compose(["task=nonexistent"])


def test_misspelt_key_fails_at_composition():
    with pytest.raises(Exception, match="n_sample"):
        _compose(["trainer.n_sample=3"])


BAD = [
    ({"trainer.n_samples": 0}, "trainer.n_samples: N must be >= 1"),
    ({"trainer.seeding": "process"}, "trainer.seeding: must be row or rank, got 'process'"),
    ({"trainer.micro_batch_size": 3}, "trainer.micro_batch_size: must divide batch_size"),
    ({"trainer.preference": [0.7, 0.7]}, "trainer.preference: weights must sum to 1"),
    ({"trainer.preference": [1.2, -0.2]}, "trainer.preference: weights must be >= 0"),
    ({"trainer.preference": [1.0]}, "trainer.preference: needs 2 weights"),
    ({"method.lam": 1.5}, "method.lam: lambda must be in"),
    ({"method.engine": "magic"}, "method.engine"),
    ({"task.objectives": ["coverage", "funny"]}, "task.objectives: unknown reward 'funny'"),
    ({"task.hv_ref": [0.0]}, "task.hv_ref"),
    ({"policy.dtype": "int8"}, "policy.dtype"),
    ({"generation.backend": "magic"}, "generation.backend: hf | vllm"),
    ({"generation.backend": "vllm"}, "generation.backend: vllm synchronises LoRA adapters"),
]


@pytest.mark.parametrize("over,msg", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_invalid_values_fail_before_any_model_loads(tmp_path, over, msg):
    # the policy path does not exist: reaching the loader would raise OSError, not ConfigError
    cfg = tiny_config(str(tmp_path / "no-model-here"), str(tmp_path / "run"), **over)
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(")):
        train(cfg)
    assert not os.path.exists(tmp_path / "run" / "config.yaml")


def test_cli_overrides_reach_the_config():
    cfg = _compose(["method=static", "trainer.seed=3", "+rewards.mine=tests.test_rewards.my_length_reward",
                    "task.objectives=[coverage,mine]"])
    assert cfg.method.lam == 1.0 and cfg.trainer.seed == 3
    assert OmegaConf.select(cfg, "rewards.mine") == "tests.test_rewards.my_length_reward"
    typed_config(cfg)


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm_gpu", "experiment=reddit_summary"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.timeout_min == 1440
