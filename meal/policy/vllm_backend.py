"""Sampling with vLLM (``generation.backend: vllm``), for GPUs; install the ``vllm`` extra.

vLLM holds its own copy of the frozen base model. Before each sampling call the policy's current
LoRA adapter is written to a fresh folder (``save_pretrained`` of the peft model: the adapter only)
and handed to vLLM as a new ``LoRARequest`` id, so vLLM samples from the weights being trained;
the previous folder is then removed. Only LoRA policies can be synchronised this way (a full
fine-tune would need the whole weights reloaded), which the constructor checks.

With a real vLLM this has not run on this project's machines (no GPU): ``tests/test_vllm.py`` runs
where vLLM and a GPU are present. The synchronisation, tokenisation and seeding are tested on CPU
against a stand-in ``vllm`` module (``tests/test_vllm_glue.py``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Sequence

from meal.policy.sampling import Generation, GenerationSettings, row_seeds


class VLLMSampler:
    """A callable with the signature of :func:`meal.policy.sampling.generate`, backed by ``vllm.LLM``."""

    def __init__(self, base_model: str, max_lora_rank: int, dtype: str = "bfloat16",
                 gpu_memory_utilization: float = 0.3, max_model_len: int | None = None, seed: int = 0,
                 external_launcher: bool = False):
        from vllm import LLM

        # external_launcher: one engine per data-parallel process, inside the process group that
        # accelerate/torchrun started (as TRL's colocate mode does), instead of vLLM spawning workers
        extra = {"distributed_executor_backend": "external_launcher"} if external_launcher else {}
        self.llm = LLM(model=base_model, enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1, dtype=dtype,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, seed=seed,
                       **extra)
        self.folder = tempfile.mkdtemp(prefix="meal-vllm-lora-")
        self.version = 0

    def sync(self, model) -> "object":
        """Write the current adapter and return the LoRARequest that makes vLLM use it."""
        from vllm.lora.request import LoRARequest

        if not hasattr(model, "peft_config"):
            raise ValueError("generation.backend=vllm synchronises LoRA adapters only: set policy.lora.enabled=true")
        self.version += 1
        path = os.path.join(self.folder, f"v{self.version}")
        model.save_pretrained(path)
        old = os.path.join(self.folder, f"v{self.version - 1}")
        if os.path.isdir(old):
            shutil.rmtree(old, ignore_errors=True)
        return LoRARequest(f"policy-v{self.version}", self.version, path)

    def __call__(self, model, tokenizer, prompts: Sequence[str], settings: GenerationSettings,
                 generator_seed: int | None = None, prefs=None, row_keys: Sequence[str] | None = None) -> Generation:
        """Sample one response per prompt, as :func:`meal.policy.sampling.generate` does.

        Prompts are tokenised here exactly as the Hugging Face path does (no added special tokens,
        truncated to ``settings.max_prompt_tokens``) and passed as token ids, so both backends
        condition on the same tokens. With ``generator_seed`` request i gets seed ``generator_seed +
        i`` (``settings.seeding == "call"``) or :func:`meal.policy.sampling.row_seeds`'s (``"row"``):
        repeated prompts still get different samples, and the call is reproducible.
        """
        from vllm import SamplingParams

        from meal.policy.preference_lora import has_preference_lora

        if has_preference_lora(model):
            raise ValueError("generation.backend=vllm cannot sample from preference-aware LoRA layers")

        ids = tokenizer(list(prompts), truncation=True, max_length=settings.max_prompt_tokens,
                        add_special_tokens=False)["input_ids"]
        seeds = None
        if generator_seed is not None:  # "row": as the Hugging Face path, a seed per (prompt, preference, repeat)
            seeds = (row_seeds(generator_seed, row_keys or prompts) if settings.seeding == "row"
                     else [generator_seed + i for i in range(len(ids))])
        params = [SamplingParams(n=1, temperature=settings.temperature, top_p=settings.top_p,
                                 top_k=settings.top_k if settings.top_k > 0 else -1,
                                 max_tokens=settings.max_new_tokens,
                                 seed=None if seeds is None else seeds[i])
                  for i in range(len(ids))]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in ids], params, lora_request=self.sync(model),
                                 use_tqdm=False)
        eos = tokenizer.eos_token_id
        texts, finished, n_tokens = [], [], 0
        for o in outs:
            c = o.outputs[0]
            token_ids = list(c.token_ids)
            stopped = c.finish_reason == "stop"
            texts.append(c.text.strip())
            finished.append(stopped)
            # as the HF path counts: the tokens before eos
            n_tokens += len(token_ids) - (1 if stopped and token_ids and token_ids[-1] == eos else 0)
        return Generation(texts, finished, n_tokens)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
