"""MetaAligner (meal/methods/metaaligner.py): Algorithm 1 on hand-made rewards, the corrector's prompt, the
three stages on the tiny model, the corrector stacked on other policies, and its config checks."""

import json
import random

import pytest
import torch

from tests.conftest import tiny_config

from meal.config import ConfigError
from meal.methods import metaaligner as ma
from meal.methods import metaaligner_data as mad
from meal.methods import train
from meal.policy.sampling import Generation, GenerationSettings

DESCRIPTIONS = {"coverage": "the summary should cover the post", "concise": "the summary should be brief",
                "positive": "the summary should be cheerful"}


def test_algorithm_1_builds_exactly_the_preference_and_equal_subsets():
    texts = ["q0", "q0", "q0", "q1", "q2", "q2"]
    responses = ["a", "b", "c", "lonely", "same", "same"]
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.1], [1.1, 1.0], [5.0, 5.0], [0.0, 0.0], [3.0, 3.0]])
    pref, equal = mad.build_dataset(texts, responses, rewards, [0, 0, 0, 1, 2, 2], 0.25, random.Random(0))

    def key(r):
        return (r.question, r.source, r.target, r.kind, tuple(sorted(zip(r.objectives, [round(w, 4)
                                                                                      for w in r.weights]))))
    # (a, b): a wins objective 0 by 1.0, equal on 1 (|0.1| <= 0.25); (a, c): equal on 0, c wins 1;
    # (b, c): c wins both, weighted by its gaps 1.1 and 0.9; a group of one and a pair of identical
    # responses give nothing
    assert sorted(map(key, pref)) == sorted([
        ("q0", "b", "a", "better", ((0, 1.0),)),
        ("q0", "a", "c", "better", ((1, 1.0),)),
        ("q0", "b", "c", "better", ((0, 0.55), (1, 0.45))),
    ])
    assert sorted(map(key, equal)) == sorted([
        ("q0", "b", "a", "equal", ((1, 1.0),)),
        ("q0", "c", "a", "equal", ((0, 1.0),)),
    ])
    warm = mad.warmup_rows(equal, 5, random.Random(0))
    assert len(warm) == 5 and all(r.source == r.target for r in warm)  # the identity map
    # a larger tolerance makes every comparison of (a, b) and (a, c) equal
    pref2, equal2 = mad.build_dataset(texts, responses, rewards, [0, 0, 0, 1, 2, 2], 2.0, random.Random(0))
    assert pref2 == [] and len(equal2) == 3 and all(sorted(r.objectives) == [0, 1] for r in equal2)


def test_the_corrector_prompt_round_trips_its_objectives_and_weights():
    names = ["coverage", "concise", "positive"]
    s = ma.CorrectorSettings(DESCRIPTIONS, names)
    text = mad.corrector_text("Post?", "An answer.", s.markers([0.7, 0.0, 0.3]))
    assert text.startswith("Edit the following Question-Answer pair to make it better considering the following "
                           "objectives: coverage (weight 0.70): the summary should cover the post; positive")
    assert text.endswith("| Question: Post? | Answer: An answer. | Edit:")
    assert mad.parse_corrector_text(text, names) == ("better", ["coverage", "positive"], [0.7, 0.3])
    plain = ma.CorrectorSettings(DESCRIPTIONS, names, weights_in_markers=False)
    text = mad.corrector_text("Q", "A", plain.markers([0.2, 0.8, 0.0]), "equal")
    assert mad.parse_corrector_text(text, names) == ("equal", ["coverage", "concise"], None)
    with pytest.raises(ConfigError, match="task.descriptions: no description of objective 'humor'"):
        mad.format_markers(["humor"], DESCRIPTIONS)


class _Fixed:
    """A stand-in policy: the same answer to everything."""

    objectives = ["coverage", "concise"]

    def respond(self, texts, prefs, settings, seed=None, n=1):
        return Generation(["FIXED ANSWER"] * (len(texts) * n), [True] * (len(texts) * n), 3 * len(texts) * n)


def test_the_corrector_stacked_on_a_stand_in_policy_rewrites_its_answers_in_one_call(tiny_llama, monkeypatch):
    from meal.config import LoraConfig, PolicyConfig
    from meal.policy.model import load_policy

    model, tok = load_policy(PolicyConfig(name_or_path=tiny_llama, dtype="float32", lora=LoraConfig(enabled=False)))
    seen = []
    real = ma.generate

    def recording(model, tokenizer, prompts, settings, seed=None, **kw):
        seen.extend(prompts)
        return real(model, tokenizer, prompts, settings, seed, **kw)

    monkeypatch.setattr(ma, "generate", recording)
    corrected = ma.Corrected(_Fixed(), model, tok, ma.CorrectorSettings(DESCRIPTIONS, ["coverage", "concise"]))
    out = corrected.respond(["Post one.", "Post two."], torch.tensor([[1.0, 0.0], [0.3, 0.7]]),
                            GenerationSettings(max_new_tokens=6), seed=0)
    assert len(out.texts) == 2 and all(t != "FIXED ANSWER" for t in out.texts)
    assert "Answer: FIXED ANSWER | Edit:" in seen[0] and "coverage (weight 1.00)" in seen[0]
    assert "concise" not in seen[0].split("objectives: ")[1].split(" | ")[0]  # w_2 = 0: not asked for
    assert "coverage (weight 0.30)" in seen[1] and "concise (weight 0.70)" in seen[1]
    cost = corrected.cost()
    assert cost["responses"] == 2 and cost["upstream_tokens_per_response"] == 3
    assert cost["corrector_tokens_per_response"] > 0


def test_the_base_policy_answers_without_preference_and_with_its_adapters_off(tiny_llama):
    """Stacked on "base": the policy (here with preference-aware LoRA, adapters moved off zero) answers the
    plain task text as the model without adapters does."""
    from meal.config import LoraConfig, PolicyConfig
    from meal.policy.model import load_policy

    model, tok = load_policy(PolicyConfig(name_or_path=tiny_llama, dtype="float32", lora=LoraConfig(
        enabled=True, preference_aware=True, r=2, alpha=4)), 2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.5)  # adapters that change every answer while they are on
    plain, _ = load_policy(PolicyConfig(name_or_path=tiny_llama, dtype="float32", lora=LoraConfig(enabled=False)))
    settings = GenerationSettings(max_new_tokens=6)
    texts, w = ["Post one.", "Post two."], torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    base = ma.PlainPolicy(model, tok, ["coverage", "concise"], base=True).respond(texts, w, settings, seed=0)
    assert base.texts == ma.PlainPolicy(plain, tok, ["coverage", "concise"]).respond(texts, w, settings, seed=0).texts


def _config(tiny_llama, out, cache, **method):
    cfg = tiny_config(tiny_llama, out, **{
        "conditioning.enabled": True, "conditioning.steps": 2, "conditioning.batch_size": 4,
        "conditioning.micro_batch_size": 2, "conditioning.pool_prompts": 4, "conditioning.pool_samples": 2,
        "conditioning.cache": cache, "task.pool_instructions": ["", "Be brief."], "task.descriptions": DESCRIPTIONS,
        "rewards.positive": {"_target_": "meal.rewards.embedded.VaderSentiment"},
        "trainer.final_eval": True, "trainer.final_eval_prompts": 2, "trainer.save_every": 2})
    cfg["method"] = {"recipe": "metaaligner", "name": "metaaligner", "tolerance": 0.1, "warmup_steps": 1,
                     "equal_steps": 1, "preference_steps": 2, "batch_size": 2, "micro_batch_size": 2,
                     "corrector": {"name_or_path": tiny_llama, "gguf_file": None, "dtype": "float32",
                                   "lora": {"enabled": True, "r": 2, "alpha": 4}}, **method}
    return cfg


def test_metaaligner_trains_three_stages_evaluates_stacked_and_zero_shot(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    from meal.harness.saved_run import EvalOptions, evaluate_run

    out = tmp_path / "ma"
    summary = train(_config(tiny_llama, str(out), str(tmp_path / "cache"), zero_shot=["positive"]))
    rows = [json.loads(x) for x in open(out / "metrics.jsonl") if "metaaligner/stage" in x]
    assert [r["metaaligner/stage"] for r in rows] == [0.0, 1.0, 2.0, 2.0]  # warm-up, equal, preference x 2
    data = [json.loads(x) for x in open(out / "metaaligner_data.jsonl")]
    assert {d["stage"] for d in data} == {"warmup", "equal", "preference"}
    assert sum(d["stage"] == "warmup" for d in data) == 2  # warmup_steps x batch_size identity rows
    assert summary["budget"]["steps"] == 4 and summary["budget"]["responses"] == 0
    corrector = load_file(str(out / "checkpoints" / "step_000004" / "net.safetensors"))
    assert corrector and all("tensors." in k for k in corrector)
    front = json.load(open(out / "front.json"))
    assert len(front["points"]) == 11 and front["extra"]["inference"]["corrector_tokens_per_response"] > 0
    table = json.load(open(out / "zero_shot" / "zero_shot.json"))
    assert set(table["rows"]) == {"uncorrected", "trained objectives", "positive only",
                                  "trained + positive"}
    assert set(table["rows"]["positive only"]["mean_raw"]) == {"coverage", "concise", "positive"}
    # meal-eval: the same corrector stacked on the base policy
    res = evaluate_run(str(out), EvalOptions(stack_on="base", prompts=2))
    stacked = json.load(open(out / "eval-on-base" / "front.json"))
    assert stacked["extra"]["stacked_on"] == "base" and res["hypervolume"] == pytest.approx(stacked["hypervolume"])
    assert len(stacked["points"]) == 11 and stacked["num_prompts"] == 2
    # a corrupt corrector checkpoint is named, not a raw safetensors error
    from meal.harness.checkpoint import CheckpointError

    (out / "checkpoints" / "step_000004" / "net.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError, match="corrector's weights"):
        evaluate_run(str(out), EvalOptions(stack_on="base", prompts=1))


@pytest.mark.parametrize("method, over, msg", [
    ({"zero_shot": ["nonexistent"]}, {}, "method.zero_shot"),
    ({"stack_on": "/no/such/run"}, {}, "method.stack_on"),
    ({"corrector": {"lora": {"preference_aware": True}}}, {}, "method.corrector.lora.preference_aware"),
    ({}, {"conditioning.enabled": False}, "conditioning.enabled"),
    ({}, {"task.descriptions": {"coverage": "x"}}, "task.descriptions"),
])
def test_a_metaaligner_config_that_contradicts_itself_names_the_field(tiny_llama, tmp_path, method, over, msg):
    cfg = _config(tiny_llama, str(tmp_path / "x"), str(tmp_path / "c"))
    cfg["method"].update(method)
    if "corrector" in method:
        cfg["method"]["corrector"] = {"name_or_path": tiny_llama, **method["corrector"]}
    for k, v in over.items():
        section, name = k.split(".")
        cfg[section][name] = v
    with pytest.raises(ConfigError, match=msg.replace(".", r"\.")):
        train(cfg)


@pytest.mark.processes
def test_metaaligner_under_accelerate_on_two_processes_trains_as_one_process(tiny_llama, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): each process trains on its half of every step's rows,
    gradients averaged, the corrector's LoRA start broadcast from rank 0. The corpus (and so every stage's
    rows) does not depend on the number of processes, so the losses and the trained corrector are the
    single process's, up to the order of floating-point sums."""
    import sys

    from safetensors.torch import load_file

    from tests.test_cli import _accelerate_config, _launch, _rows, tiny_overrides

    common = ["method=metaaligner", "method.batch_size=4", "method.micro_batch_size=2", "method.tolerance=0.1",
              "method.warmup_steps=1", "method.equal_steps=1", "method.preference_steps=2", "method.corrector.lora.r=2",
              "method.corrector.lora.alpha=4", "conditioning.pool_samples=2", "conditioning.steps=2",
              "task.pool_instructions=['','Be brief.']", "trainer.final_eval=false", "trainer.save_every=2",
              "task.descriptions={coverage:'the summary should cover the post',concise:'the summary should be brief'}"]
    one, two = tmp_path / "one", tmp_path / "two"

    def tiny(out):  # the CLI tests' tiny run, less Meal's own knob
        return [o for o in tiny_overrides(tiny_llama, out) if not o.startswith("method.")] + common

    from tests.test_config import _compose

    from meal.methods import train

    train(_compose(tiny(one)))  # one process, here
    _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
             _accelerate_config(tmp_path, "multi_gpu.yaml"), "--main_process_port", "29535", "-m", "meal.cli.train",
             *tiny(two)], tmp_path)
    a, b = _rows(one), _rows(two)
    assert [r["step"] for r in b] == [r["step"] for r in a] == [1, 2, 3, 4]  # one writer
    assert [r["metaaligner/stage"] for r in b] == [0.0, 1.0, 2.0, 2.0]
    assert {(r["train/processes"], r["train/rows_per_process"]) for r in a} == {(1, 4)}
    assert {(r["train/processes"], r["train/rows_per_process"]) for r in b} == {(2, 2)}  # each its half
    for x, y in zip(a, b):
        assert y["train/loss"] == pytest.approx(x["train/loss"], rel=1e-4)
        assert y["train/grad_norm"] == pytest.approx(x["train/grad_norm"], rel=1e-3)
    start = load_file(str(one / "checkpoints" / "step_000002" / "net.safetensors"))
    wa, wb = (load_file(str(d / "checkpoints" / "step_000004" / "net.safetensors")) for d in (one, two))
    assert wa.keys() == wb.keys() and any(not torch.equal(wa[n], start[n]) for n in wa)  # it trained ...
    for n in wa:  # ... to the same corrector
        torch.testing.assert_close(wb[n], wa[n], rtol=1e-4, atol=1e-6)
