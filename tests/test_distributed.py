"""DeepSpeed configuration as meal resolves it (no processes launched; the launch itself is in test_cli)."""

import pytest
import torch

from meal.config import ConfigError
from meal.harness.distributed import AdamWStep, Dist, resolve_deepspeed_config

SIZES = dict(micro_batch_size=2, accumulation=3, world=4, max_grad_norm=1.0)


def test_auto_values_are_filled_from_the_trainer_and_dtype():
    raw = {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}, "train_batch_size": "auto",
           "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "gradient_clipping": "auto", "bf16": {"enabled": "auto"}}
    cfg = resolve_deepspeed_config(raw, dtype=torch.bfloat16, **SIZES)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"],
            cfg["gradient_clipping"]) == (2, 3, 24, 1.0)
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert "reduce_bucket_size" not in cfg["zero_optimization"]  # DeepSpeed's default applies
    assert raw["train_batch_size"] == "auto"  # the input is not modified
    assert resolve_deepspeed_config(raw, dtype=torch.float32, **SIZES)["bf16"] == {"enabled": False}


Z2 = {"zero_optimization": {"stage": 2}}


@pytest.mark.parametrize("raw, message", [
    ({"zero_optimization": {"stage": 3}}, "stage 3 partitions the policy's weights"),
    ({"train_batch_size": "auto"}, "stage=0: meal runs DeepSpeed for ZeRO stage 1 or 2 only"),
    ({**Z2, "optimizer": {"type": "AdamW"}}, "defines 'optimizer'"),
    ({**Z2, "scheduler": {"type": "WarmupLR"}}, "defines 'scheduler'"),
    ({**Z2, "train_micro_batch_size_per_gpu": 8},
     "train_micro_batch_size_per_gpu=8, but meal's trainer settings give 2"),
    ({**Z2, "gradient_clipping": 0.5}, "gradient_clipping=0.5"),
])
def test_what_the_trainer_cannot_honour_is_refused_by_name(raw, message):
    with pytest.raises(ConfigError, match=message):
        resolve_deepspeed_config(raw, dtype=torch.float32, **SIZES)


def test_explicit_values_that_agree_are_kept():
    cfg = resolve_deepspeed_config({"train_batch_size": 24, "zero_optimization": {"stage": 1}},
                                   dtype=torch.float32, **SIZES)
    assert cfg["train_batch_size"] == 24 and cfg["zero_optimization"] == {"stage": 1}


def test_plain_optimizer_refuses_a_deepspeed_checkpoint():
    step = AdamWStep({"w": torch.nn.Parameter(torch.zeros(2))}, 1e-3, 0.0, 1.0, Dist())
    with pytest.raises(ConfigError, match="written under DeepSpeed ZeRO"):
        step.load_state_dict({"deepspeed_zero": [{}]})


def test_the_launchers_deepspeed_settings_are_read_and_checked_before_the_policy_loads(monkeypatch):
    """What `accelerate launch --use_deepspeed --zero_stage N` puts in the environment."""
    from omegaconf import OmegaConf

    from meal.config import TrainerConfig
    from meal.harness.distributed import deepspeed_config

    t = OmegaConf.structured(TrainerConfig(batch_size=8, top_m=1, micro_batch_size=2))
    assert deepspeed_config(t, Dist(), torch.float32) is None  # not launched with DeepSpeed
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    cfg = deepspeed_config(t, Dist(), torch.float32)
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["gradient_accumulation_steps"] == 4
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ConfigError, match="stage=3"):
        deepspeed_config(t, Dist(), torch.float32)
