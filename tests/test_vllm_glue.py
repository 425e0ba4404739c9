"""meal's glue to vLLM, on CPU, against a stand-in ``vllm`` module (the real engine: tests/test_vllm.py).

The stand-in records what meal hands to vLLM (token ids, sampling parameters, the LoRA adapter
folder) and answers with fixed responses; what is checked is meal's side: the prompts are the
tokens the Hugging Face path would condition on, seeds differ per request, and the adapter vLLM
is told to load is the policy's current one, a new id each rollout, old folders removed.
"""

import os
import sys
import types
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config

from meal.policy.sampling import GenerationSettings


@dataclass
class FakeLLM:
    kwargs: dict
    calls: list = field(default_factory=list)

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        folder = lora_request.lora_path
        adapter = load_file(os.path.join(folder, "adapter_model.safetensors"))  # read now: meal removes it later
        self.calls.append({"prompts": prompts, "params": params, "lora": lora_request, "adapter": adapter})
        eos = FakeLLM.eos
        outs = []
        for i, _ in enumerate(prompts):
            stop = i % 2 == 0  # half stop at eos (its id included, as vLLM returns it), half hit max_tokens
            ids = [5, 6, eos] if stop else [5, 6, 7, 8]
            text = "a short answer" if stop else "a longer answer that ran out"
            c = types.SimpleNamespace(text=f" {text} ", token_ids=ids, finish_reason="stop" if stop else "length")
            outs.append(types.SimpleNamespace(outputs=[c]))
        return outs


@dataclass
class FakeSamplingParams:
    n: int
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    seed: int | None


@dataclass
class FakeLoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


@pytest.fixture
def fake_vllm(monkeypatch):
    made = []

    def llm(**kwargs):
        made.append(FakeLLM(kwargs))
        return made[-1]

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = llm, FakeSamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = FakeLoRARequest
    for name, mod in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, mod)
    return made


def test_prompts_seeds_and_counts_match_the_hf_path(fake_vllm, tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meal.policy.vllm_backend import VLLMSampler

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    FakeLLM.eos = tok.eos_token_id
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    sampler = VLLMSampler(tiny_llama, max_lora_rank=4, seed=3)
    assert fake_vllm[0].kwargs["enable_lora"] and fake_vllm[0].kwargs["max_lora_rank"] == 4
    prompts = ["<|im_start|>user\nsame prompt<|im_end|>\n"] * 3 + ["word " * 50]
    settings = GenerationSettings(max_new_tokens=7, top_p=0.9, top_k=0, temperature=0.8, batch_size=4,
                                  max_prompt_tokens=16)
    gen = sampler(model, tok, prompts, settings, generator_seed=100)
    call = fake_vllm[0].calls[0]
    expected = tok(prompts, truncation=True, max_length=16, add_special_tokens=False)["input_ids"]
    assert [p["prompt_token_ids"] for p in call["prompts"]] == expected  # what HF generate conditions on
    assert len(expected[3]) == 16  # the long prompt is truncated as in the HF path
    assert [p.seed for p in call["params"]] == [100, 101, 102, 103]  # repeated prompts, different samples
    p = call["params"][0]
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.8, 0.9, -1, 7)
    assert gen.texts[:2] == ["a short answer", "a longer answer that ran out"]
    assert gen.finished == [True, False, True, False]
    assert gen.num_tokens == 2 + 4 + 2 + 4  # eos not counted, as in the HF path
    from dataclasses import replace

    from meal.policy.sampling import row_seeds

    sampler(model, tok, prompts, replace(settings, seeding="row"), generator_seed=100)  # evaluation
    seeds = [p.seed for p in fake_vllm[0].calls[1]["params"]]
    assert seeds == row_seeds(100, prompts) and len(set(seeds)) == 4  # as the HF path: per prompt and repeat
    sampler(model, tok, prompts, settings)  # training rollouts: unseeded
    assert [p.seed for p in fake_vllm[0].calls[2]["params"]] == [None] * 4
    sampler.close()


def test_training_hands_vllm_the_current_adapter_each_rollout(fake_vllm, tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from meal.methods import train

    FakeLLM.eos = AutoTokenizer.from_pretrained(tiny_llama).eos_token_id
    cfg = tiny_config(tiny_llama, str(tmp_path / "run"), **{
        "policy.lora": {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "generation.backend": "vllm", "trainer.iterations": 3, "trainer.lr": 1e-2})
    train(cfg)
    calls = fake_vllm[0].calls
    # the normalisation pass (seeded per call) and the three training rollouts (each response seeded by
    # (trainer.seed, iteration, prompt, repeat): trainer.seeding=row) went through vLLM
    assert len(calls) == 4 and all(p.seed is not None for c in calls for p in c["params"])
    online = [[p.seed for p in c["params"]] for c in calls[1:]]
    assert all(len(set(seeds)) == len(seeds) for seeds in online)  # every response of an iteration its own seed
    assert not set(online[0]) & set(online[1])  # and a new seed every iteration
    ids = [c["lora"].lora_int_id for c in calls]
    assert ids == sorted(set(ids)) and ids[0] >= 1  # a new adapter id every time
    folders = [c["lora"].lora_path for c in calls]
    assert not any(os.path.isdir(f) for f in folders)  # old adapters removed, the last one at the end
    # rollout 1 sees the initial adapter (LoRA B = 0), later rollouts the trained one
    b_keys = [k for k in calls[1]["adapter"] if "lora_B" in k]
    assert b_keys and all(torch.count_nonzero(calls[1]["adapter"][k]) == 0 for k in b_keys)
    assert any(torch.count_nonzero(calls[3]["adapter"][k]) > 0 for k in b_keys)
    assert not torch.equal(calls[2]["adapter"][b_keys[0]], calls[3]["adapter"][b_keys[0]])


def test_each_data_parallel_rank_gets_its_own_engine_in_the_launchers_process_group(fake_vllm, tiny_llama):
    from omegaconf import OmegaConf

    from meal.harness.settings import read_run_spec, training_sampler
    from meal.methods import typed_config

    cfg = typed_config(tiny_config(tiny_llama, "unused", **{"generation.backend": "vllm", "trainer.seed": 7,
                                                        "policy.lora": {"enabled": True, "r": 8}}))
    assert read_run_spec(OmegaConf.merge(cfg, {"generation": {"backend": "hf"}})).vllm is None
    spec = read_run_spec(cfg).vllm
    for sampler in (training_sampler(spec), training_sampler(spec, rank=1, world=2)):
        sampler.close()
    single, rank1 = (m.kwargs for m in fake_vllm)
    assert "distributed_executor_backend" not in single and single["seed"] == 7 and single["max_lora_rank"] == 8
    assert rank1["distributed_executor_backend"] == "external_launcher" and rank1["seed"] == 8
