"""The conditioning stage's data records (``meal.harness.conditioning``): the scored corpus of step 0a and the
labelled rows the online stage replays, each saved as JSON lines and read back."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from meal.harness.budget import Budget


@dataclass
class ScoredCorpus:
    """M responses in prompt groups with their raw rewards (M, K); ``texts[i]`` is the task text
    response i answers (what rewards and the template see)."""

    objectives: list[str]
    texts: list[str]
    responses: list[str]
    finished: list[bool]
    groups: list[int]
    raw: torch.Tensor
    source: str
    budget: Budget

    def __len__(self) -> int:
        return len(self.responses)

    def save(self, path: str) -> None:
        """JSON lines: a header, then one row per response. Written atomically."""
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"objectives": self.objectives, "source": self.source,
                                "budget": self.budget.as_dict(), "rows": len(self)}) + "\n")
            for i in range(len(self)):
                f.write(json.dumps({"group": self.groups[i], "text": self.texts[i], "response": self.responses[i],
                                    "finished": self.finished[i], "raw": self.raw[i].tolist()}) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "ScoredCorpus":
        with open(path, encoding="utf-8") as f:
            head = json.loads(f.readline())
            rows = [json.loads(line) for line in f]
        if len(rows) != head["rows"]:
            raise ValueError(f"{path}: {len(rows)} rows, the header says {head['rows']} (an interrupted write?)")
        return cls(head["objectives"], [r["text"] for r in rows], [r["response"] for r in rows],
                   [r["finished"] for r in rows], [r["group"] for r in rows],
                   torch.tensor([r["raw"] for r in rows], dtype=torch.float32).reshape(len(rows), -1),
                   head["source"], Budget.from_dict(head["budget"]))


@dataclass
class ReplaySet:
    """The stage's labelled rows (task text, response, label (E, K)): what the online stage mixes into its
    SFT steps with ``trainer.replay``, as RiC's online stage adds original samples to its new ones."""

    texts: list[str]
    responses: list[str]
    finished: list[bool]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.responses)

    @classmethod
    def from_corpus(cls, corpus: ScoredCorpus, rows: np.ndarray, labels: torch.Tensor) -> "ReplaySet":
        rows = rows.tolist()
        return cls([corpus.texts[i] for i in rows], [corpus.responses[i] for i in rows],
                   [corpus.finished[i] for i in rows], labels.float())

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for i in range(len(self)):
                f.write(json.dumps({"text": self.texts[i], "response": self.responses[i],
                                    "finished": self.finished[i], "label": self.labels[i].tolist()}) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "ReplaySet":
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        return cls([r["text"] for r in rows], [r["response"] for r in rows], [r["finished"] for r in rows],
                   torch.tensor([r["label"] for r in rows], dtype=torch.float32))
