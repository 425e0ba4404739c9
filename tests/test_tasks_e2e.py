"""The paper's task pipelines end to end on tiny local stand-ins (no network).

The real experiment configs (conf/experiment/{helpful_assistant,reddit_summary}.yaml) are composed
as a user would, then pointed at: a tiny random policy, tiny random reward classifiers (one per
input convention, as configured), and a few rows of local data in the data sets' own schemas.
"""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.test_config import CONF

from meal.config import register_configs
from meal.evaluation.front import Front
from meal.methods import train


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory, tokenizer_dir):
    """A tiny GPT-2 classifier (SmolLM2 tokenizer: has a bos for the summary convention) and a tiny
    BERT classifier (MiniLM WordPiece: text pairs as BART's faithfulness detector), 2 logits each."""
    from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, GPT2Config,
                              GPT2ForSequenceClassification)

    from meal.rewards.embedded import minilm_path

    torch.manual_seed(0)
    gpt_dir = str(tmp_path_factory.mktemp("gpt2clf"))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=1024,
                                             num_labels=2, pad_token_id=tok.pad_token_id)).save_pretrained(gpt_dir)
    tok.save_pretrained(gpt_dir)
    bert_dir = str(tmp_path_factory.mktemp("bertclf"))
    btok = AutoTokenizer.from_pretrained(minilm_path())
    BertForSequenceClassification(BertConfig(vocab_size=btok.vocab_size, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32, num_labels=2)
                                  ).save_pretrained(bert_dir)
    btok.save_pretrained(bert_dir)
    return gpt_dir, bert_dir


def _compose(exp, overrides):
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=[f"experiment={exp}", *overrides])


def _tiny(model_dir, out_dir):
    return [f"policy.name_or_path={model_dir}", "policy.dtype=float32", "policy.gradient_checkpointing=false",
            "policy.lora.r=4", "policy.lora.alpha=8", "method.engine=directional", "method.directional_mode=jvp",
            "task.max_new_tokens=6", "trainer.iterations=2", "trainer.batch_size=4", "trainer.n_samples=2",
            "trainer.micro_batch_size=2", "trainer.gen_batch_size=8", "trainer.norm_prompts=4",
            "trainer.eval_every=0", "trainer.final_eval_prompts=2", "trainer.stats_cache=null",
            "trainer.table_every=1", "logger=none", f"trainer.out_dir={out_dir}",
            "conditioning.steps=4", "conditioning.batch_size=4", "conditioning.micro_batch_size=2",
            "conditioning.save_every=2", f"conditioning.cache={out_dir}-cache",
            "task.validation_prompts=0"]  # the corpus counts below hold every training prompt's responses


def _stage(run_dir):
    with open(run_dir / "conditioning" / "stage.json") as f:
        return json.load(f)


def _hh_rows(n, tag):
    return [{"chosen": f"\n\nHuman: {tag} question {i}?\n\nAssistant: A fine answer {i}.",
             "rejected": f"\n\nHuman: {tag} question {i}?\n\nAssistant: No."} for i in range(n)]


@pytest.mark.parametrize("objectives,points", [("[harmless,helpful]", 11), ("[harmless,helpful,humor]", 13)])
def test_helpful_assistant_pipeline(tiny_llama, classifiers, tmp_path, objectives, points):
    gpt_dir, bert_dir = classifiers
    for split, n in (("train", 6), ("test", 12)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _hh_rows(n, split)))
    hv = "[-3,-3]" if points == 11 else "[-3,-3,-3]"
    cfg = _compose("helpful_assistant", _tiny(tiny_llama, tmp_path / "run") + [
        f"+task.data.data_files={{train:{tmp_path}/train.jsonl,test:{tmp_path}/test.jsonl}}",
        f"task.objectives={objectives}", f"task.hv_ref={hv}",
        f"rewards.harmless.model_name_or_path={gpt_dir}", f"rewards.helpful.model_name_or_path={gpt_dir}",
        f"rewards.humor.model_name_or_path={bert_dir}", "rewards.harmless.device=cpu",
        "rewards.helpful.device=cpu", "rewards.humor.device=cpu"])
    assert cfg.rewards.helpful._target_ == "meal.rewards.hf.TextPairReward"
    assert cfg.rewards.humor.logit_index == 1 and cfg.policy.lora.r == 4
    assert cfg.conditioning.source == "dataset" and cfg.conditioning.lr == pytest.approx(1.414e-4)  # RiC's stage
    train(cfg)
    front = Front.load(str(tmp_path / "run" / "front.json"))
    assert len(front.points) == points and front.num_prompts == 2
    stage = _stage(tmp_path / "run")  # step 0 on the data set's own final turns, chosen and rejected
    assert stage["corpus"]["source"] == "dataset" and stage["corpus"]["rows"] == 12


def test_reddit_summary_pipeline(tiny_llama, classifiers, tmp_path):
    gpt_dir, bert_dir = classifiers
    rows = [{"info": {"id": f"p{i}", "post": f"Post number {i}. " + "Some details here. " * 8, "title": "t",
                      "subreddit": "r"}, "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0} for i in range(8)]
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _compose("reddit_summary", _tiny(tiny_llama, tmp_path / "run") + [
        f"+task.data.data_files={{train:{tmp_path}/train.jsonl,validation:{tmp_path}/validation.jsonl}}",
        f"rewards.summary.model_name_or_path={gpt_dir}", f"rewards.faithful.model_name_or_path={bert_dir}",
        "rewards.summary.device=cpu", "rewards.faithful.device=cpu"])
    assert cfg.rewards.summary._target_ == "meal.rewards.hf.SummaryBosPostReward"
    assert cfg.rewards.faithful._target_ == "meal.rewards.hf.TextAndPairReward"
    train(cfg)
    front = Front.load(str(tmp_path / "run" / "front.json"))
    assert len(front.points) == 11
    stage = _stage(tmp_path / "run")  # both summaries of each of the 8 comparisons
    assert stage["corpus"]["source"] == "dataset" and stage["corpus"]["rows"] == 16
