"""The vLLM sampling backend: runs where vLLM and a GPU are present, skipped otherwise."""

import pytest
import torch

from tests.conftest import tiny_config

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM needs a GPU")


def test_training_with_vllm_sampling(tiny_llama, tmp_path):
    from meal.methods import train

    cfg = tiny_config(tiny_llama, str(tmp_path / "run"), **{
        "policy.lora": {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "policy.device": "cuda", "generation.backend": "vllm", "generation.vllm_gpu_memory_utilization": 0.2})
    summary = train(cfg)
    assert summary["iterations"] == 2 and summary["train/tokens_per_s"] > 0
