"""meal-export: a run at one preference as a plain transformers model folder that answers as meal does;
bad input named before anything is written."""

import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import tiny_config

from meal.cli.export import Export, export_run, fold_preference_lora
from meal.cli.generate import Ask, answer
from meal.config import ConfigError
from meal.methods import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA = {"enabled": True, "preference_aware": True, "r": 2, "alpha": 4}
PROMPTS = ["Post: my cat knocked a glass off the table.", "Post: the bus was late again and I missed work."]

# run without meal: plain transformers, the prompt built from meal_prompt.json as the model card says
PLAIN = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
if len(sys.argv) > 3:  # format=adapter: plain peft on the base model
    from peft import PeftModel
    tok, model = AutoTokenizer.from_pretrained(d), PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[3]), d)
else:
    tok, model = AutoTokenizer.from_pretrained(d), AutoModelForCausalLM.from_pretrained(d)
p = json.load(open(d + "/meal_prompt.json"))
for q in json.loads(sys.argv[2]):
    user = p["user"].format(text=q)
    messages = [{"role": "system", "content": p["system"]}] if p["system"] else []
    messages.append({"role": "user", "content": user})
    chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = chat if p["chat"] else user + p["suffix"]
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
    print(json.dumps(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()))
assert "meal" not in sys.modules
"""


@pytest.fixture(scope="module")
def run(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    train(tiny_config(tiny_llama, str(out), **{"policy.lora": LORA, "trainer.lr": 3e-2, "method.weight_path": False,
                                               "method.weight_net": {"hidden": 16, "features": 8},
                                               "trainer.final_eval": True, "trainer.final_eval_prompts": 1}))
    return out


def test_folding_the_preference_adapters_gives_the_same_logits(run):
    from meal.harness.saved_run import load_run
    from meal.policy.preference_lora import preference_weights

    _, model, tok, _ = load_run(str(run))
    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"]
    w = [0.3, 0.7]
    with torch.no_grad(), preference_weights(model, torch.tensor([w])):
        before = model(ids).logits
    with torch.no_grad(), preference_weights(model, torch.tensor([[1.0, 0.0]])):
        elsewhere = model(ids).logits
    assert not torch.allclose(before, elsewhere)  # the trained adapters make the preference matter
    with torch.no_grad():
        folded = fold_preference_lora(model, w)(ids).logits
    torch.testing.assert_close(folded, before, rtol=1e-4, atol=1e-4)


def test_the_export_loads_with_plain_transformers_and_answers_as_meal_does(run, tmp_path):
    out = export_run(str(run), [0.3, 0.7], str(tmp_path / "model"))
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "meal_prompt.json", "README.md"} <= files
    assert "meal" not in open(os.path.join(out, "config.json")).read()
    card = open(os.path.join(out, "README.md")).read()
    assert "at preference coverage 0.30, concise 0.70" in card and "Hypervolume" in card and "responses" in card
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PLAIN, out, json.dumps(PROMPTS)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    meal = [r["response"] for r in answer(str(run), Ask(PROMPTS, [[0.3, 0.7]], greedy=True, max_new_tokens=8,
                                                         batch_size=1))]
    assert plain == meal  # token for token, greedy


def test_the_adapter_export_loads_with_plain_peft_and_answers_as_meal_does(run, tiny_llama, tmp_path):
    """format=adapter: the preference-aware blocks at w as one ordinary LoRA of rank (K+1) r (here 3 x 2)."""
    out = export_run(str(run), [0.3, 0.7], str(tmp_path / "adapter"), Export(fmt="adapter"))
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "meal_prompt.json",
            "README.md"} <= files and "model.safetensors" not in files
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["r"] == 6 and config["lora_alpha"] == 12 and config["base_model_name_or_path"] == tiny_llama
    assert "PeftModel.from_pretrained(base, DIR)" in open(os.path.join(out, "README.md")).read()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PLAIN, out, json.dumps(PROMPTS), tiny_llama], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    meal = [r["response"] for r in answer(str(run), Ask(PROMPTS, [[0.3, 0.7]], greedy=True, max_new_tokens=8,
                                                         batch_size=1))]
    assert plain == meal
    with pytest.raises(ConfigError, match="format: merged \\| adapter, got 'gguf'"):
        export_run(str(run), [0.3, 0.7], str(tmp_path / "x"), Export(fmt="gguf"))


def test_a_half_precision_export_is_saved_so_and_says_what_it_rounds(run, tmp_path):
    from safetensors import safe_open

    out = export_run(str(run), [0.3, 0.7], str(tmp_path / "bf16"), Export(dtype="bfloat16"))
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert "in bfloat16 (its licence applies). The fold was rounded" in open(os.path.join(out, "README.md")).read()


def test_bad_export_input_is_named_and_nothing_is_written(run, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="out: .*busy exists and is not empty .*overwrite=true"):
        export_run(str(run), [0.5, 0.5], str(busy))
    assert os.listdir(busy) == ["mine.txt"]
    with pytest.raises(ConfigError, match="dtype: auto \\| float32 \\| bfloat16 \\| float16, got 'fp8'"):
        export_run(str(run), [0.5, 0.5], str(tmp_path / "d"), Export(dtype="fp8"))
    assert not (tmp_path / "d").exists()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", "meal.cli.export", f"run_dir={run}", "preference=[0.5,0.6]",
                           f"out={tmp_path / 'new'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "preference: [0.5, 0.6] is not on the simplex" in proc.stderr and not (tmp_path / "new").exists()
    ma = tmp_path / "ma"
    os.makedirs(ma / "checkpoints" / "step_000001")
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.method = {"recipe": "metaaligner", "name": "metaaligner"}
    OmegaConf.save(cfg, ma / "config.yaml")
    (ma / "checkpoints" / "latest").write_text("step_000001")
    with pytest.raises(ConfigError, match="is a metaaligner run: MetaAligner answers with two models"):
        export_run(str(ma), [0.5, 0.5], str(tmp_path / "ma-out"))
    assert not (tmp_path / "ma-out").exists()


def assert_export_answers_as_the_run(run_dir, w, out) -> None:
    """Export ``run_dir`` at ``w`` and check that plain transformers' logits on a conditioned prompt equal the
    run's own at w (its method's weights at w: a soup's mix, MORLHF's policy; the adapters at w), and so do
    plain peft's on the base model with the ``format=adapter`` export."""
    from transformers import AutoModelForCausalLM

    from meal.harness.saved_run import load_run
    from meal.methods import get
    from meal.policy.preference_lora import preference_weights

    cfg, model, tok, _ = load_run(str(run_dir))
    responder = get(cfg.method.recipe).responder(cfg, model, tok, str(run_dir))
    responder.load_weights(w)
    from meal.policy.templates import render_prompt

    prompt = render_prompt(cfg.task.template, PROMPTS[0], responder.preference_text(w), tok)  # as meal_prompt.json
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad(), preference_weights(model, torch.tensor([w])):
        theirs = model(ids).logits
    plain = AutoModelForCausalLM.from_pretrained(export_run(str(run_dir), w, str(out)))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, theirs, rtol=1e-4, atol=1e-4)
    if not cfg.policy.lora.enabled:
        return
    from peft import PeftModel  # format=adapter: a standard LoRA adapter on the base model, the same logits

    adapter = export_run(str(run_dir), w, f"{out}-adapter", Export(fmt="adapter"))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.policy.name_or_path), adapter)
    with torch.no_grad():
        torch.testing.assert_close(peft(ids).logits, theirs, rtol=1e-4, atol=1e-4)
