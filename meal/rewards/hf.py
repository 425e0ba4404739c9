"""Hugging Face sequence-classification reward models, one class per input convention.

The convention and the logit to read are explicit configuration (method.md: "one reward class per
convention, chosen by config, never by looking at the checkpoint's name"):

===========================  ==========================================  =========================
class                         what the classifier is fed                  used by (method.md)
===========================  ==========================================  =========================
:class:`TextPairReward`       ``tokenizer(prompt, response)``             Ray2333 harmless/helpful
:class:`ResponseOnlyReward`   ``tokenizer(response)``                     humor-no-humor (logit 1)
:class:`SummaryBosPostReward` ``tokenizer(summary + " " + bos + " " + post)``  gpt2_reward_summarization
:class:`TextAndPairReward`    ``tokenizer(text=summary, text_pair=post)`` bart-faithful-summary
===========================  ==========================================  =========================
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch


class SequenceClassifierReward(ABC):
    """Base: load ``AutoModelForSequenceClassification`` and return ``logits[:, logit_index]`` (B,).

    Subclasses only define :meth:`inputs`, the texts the tokenizer is called with.
    """

    def __init__(self, model_name_or_path: str, logit_index: int, device: str = "auto", dtype: str = "float32",
                 batch_size: int = 16, max_length: int = 512):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_name_or_path, dtype=getattr(torch, dtype)).to(device).eval()
        n_labels = self.model.config.num_labels
        if not 0 <= logit_index < n_labels:
            raise ValueError(f"logit_index {logit_index} out of range for {model_name_or_path} ({n_labels} logits)")
        if self.tokenizer.pad_token is None:  # GPT-2 reward models ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.eos_token_id
        self.logit_index, self.device, self.batch_size, self.max_length = logit_index, device, batch_size, max_length

    @abstractmethod
    def inputs(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[list[str], list[str] | None]:
        """(text, text_pair or None) for the tokenizer: what defines a convention."""

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        text, pair = self.inputs(prompts, responses)
        out = []
        for i in range(0, len(text), self.batch_size):
            chunk_pair = None if pair is None else pair[i:i + self.batch_size]
            enc = self.tokenizer(text[i:i + self.batch_size], chunk_pair, padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            out.append(self.model(**enc).logits[:, self.logit_index].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


class TextPairReward(SequenceClassifierReward):
    """The (dialogue, response) text pair."""

    def inputs(self, prompts, responses):
        return list(prompts), list(responses)


class ResponseOnlyReward(SequenceClassifierReward):
    """The response alone."""

    def inputs(self, prompts, responses):
        return list(responses), None


class SummaryBosPostReward(SequenceClassifierReward):
    """One string: summary + " " + bos + " " + post."""

    def inputs(self, prompts, responses):
        bos = self.tokenizer.bos_token or ""
        return [f"{r} {bos} {p}" for p, r in zip(prompts, responses)], None


class TextAndPairReward(SequenceClassifierReward):
    """text = summary (the response), text_pair = post (the prompt)."""

    def inputs(self, prompts, responses):
        return list(responses), list(prompts)
