"""MetaAligner's text and data (:mod:`meal.methods.metaaligner`): the corrector's prompt (the paper's text
markers, with the preference's weights written in) and Algorithm 1, which turns a scored corpus into its
preference and equal subsets."""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from meal.config import ConfigError

TEMPLATE = ("Edit the following Question-Answer pair to make it {target} considering the following objectives: "
            "{objectives} | Question: {question} | Answer: {answer} | Edit:")
STAGES = ("warmup", "equal", "preference")


# --------------------------------------------------------------------------------------------- prompts
def format_markers(names: Sequence[str], descriptions: dict[str, str], weights: Sequence[float] | None = None
                   ) -> str:
    """The objectives' text markers, "name: description; name: description" (the paper's O), each name
    followed by its weight with two decimals when ``weights`` is given."""
    parts = []
    for i, name in enumerate(names):
        if name not in descriptions:
            raise ConfigError(f"task.descriptions: no description of objective {name!r} (MetaAligner writes each "
                              f"objective as text; known: {sorted(descriptions)})")
        head = name if weights is None else f"{name} (weight {float(weights[i]):.2f})"
        parts.append(f"{head}: {descriptions[name]}")
    return "; ".join(parts)


def corrector_text(question: str, answer: str, markers: str, target: str = "better") -> str:
    """The paper's template T(q, y, O, t), t in {better, equal}."""
    return TEMPLATE.format(target=target, objectives=markers, question=question, answer=answer)


def parse_corrector_text(text: str, known: Sequence[str]) -> tuple[str, list[str], list[float] | None]:
    """(target, objective names, weights or None) read back from a :func:`corrector_text` string."""
    m = re.search(r"to make it (\w+) considering the following objectives: (.*?) \| Question: ", text, re.S)
    if m is None:
        raise ValueError("not a corrector prompt")
    names, weights = [], []
    for part in m.group(2).split("; "):
        head = part.split(":", 1)[0]
        w = re.fullmatch(r"(.+) \(weight (\d+\.\d\d)\)", head)
        name = w.group(1) if w else head
        if name not in known:
            raise ValueError(f"unknown objective {name!r} in a corrector prompt")
        names.append(name)
        if w:
            weights.append(float(w.group(2)))
    return m.group(1), names, (weights if weights else None)


def wrap(text: str, tokenizer, chat: bool, suffix: str = "") -> str:
    """A user turn in the model's chat template (generation prompt added), or plain text + ``suffix``."""
    if not chat:
        return text + suffix
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


# ------------------------------------------------------------------------------------------ Algorithm 1
@dataclass
class CorrectionRow:
    """One training example: rewrite ``source`` into ``target`` for ``objectives`` (indices, in prompt order),
    weighted by ``weights`` (sum 1); ``kind`` better | equal."""

    question: str
    source: str
    target: str
    objectives: list[int]
    weights: list[float]
    kind: str
    finished: bool = True


def compare_pair(r1: Sequence[float], r2: Sequence[float], tolerance: float) -> list[str]:
    """Per objective: '>' (y1 better by more than ``tolerance``), '<' (y2 better), '=' (within it)."""
    return [">" if a - b > tolerance else "<" if b - a > tolerance else "=" for a, b in zip(r1, r2)]


def build_dataset(texts: Sequence[str], responses: Sequence[str], rewards: torch.Tensor, groups: Sequence[int],
                  tolerance: float, rng: random.Random, finished: Sequence[bool] | None = None
                  ) -> tuple[list[CorrectionRow], list[CorrectionRow]]:
    """Algorithm 1 over every pair (i < j) of responses in one prompt group: (D_p, D_e).

    ``rewards`` (M, K) normalised. For the pair (y1, y2) = (i, j): the objectives where y1 wins give the
    row T(q, y2, O_win, better) -> y1, those where y2 wins T(q, y1, O_win, better) -> y2, the equal ones
    T(q, y2, O_eq, equal) -> y1; each objective list shuffled (``rng``). A preference row's weights are
    its reward gaps on O_win normalised to sum 1; an equal row's are uniform.
    """
    finished = list(finished) if finished is not None else [True] * len(responses)
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    pref, equal = [], []
    r = rewards.tolist()
    for g in sorted(by_group):
        members = by_group[g]
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                i, j = members[a], members[b]
                if responses[i] == responses[j]:
                    continue  # a pair of identical responses says nothing about any objective
                rel = compare_pair(r[i], r[j], tolerance)
                for sym, strong, weak in ((">", i, j), ("<", j, i)):
                    objs = [k for k, s in enumerate(rel) if s == sym]
                    if objs:
                        rng.shuffle(objs)
                        gaps = [abs(r[i][k] - r[j][k]) for k in objs]
                        pref.append(CorrectionRow(texts[i], responses[weak], responses[strong], objs,
                                                  [x / sum(gaps) for x in gaps], "better", finished[strong]))
                objs = [k for k, s in enumerate(rel) if s == "="]
                if objs:
                    rng.shuffle(objs)
                    equal.append(CorrectionRow(texts[i], responses[j], responses[i], objs,
                                               [1.0 / len(objs)] * len(objs), "equal", finished[i]))
    return pref, equal


def warmup_rows(equal: Sequence[CorrectionRow], n: int, rng: random.Random) -> list[CorrectionRow]:
    """3a: ``n`` rows of D_e (a seeded sample, with repeats only when D_e is smaller) whose target is the
    response it is given: the identity map."""
    if not equal:
        return []
    pick = rng.sample(range(len(equal)), n) if n <= len(equal) else [rng.randrange(len(equal)) for _ in range(n)]
    return [CorrectionRow(equal[i].question, equal[i].source, equal[i].source, equal[i].objectives,
                          equal[i].weights, "equal", True) for i in pick]


def save_rows(path: str, rows: dict[str, list[CorrectionRow]]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for stage, items in rows.items():
            for row in items:
                f.write(json.dumps({"stage": stage, **asdict(row)}) + "\n")
    os.replace(tmp, path)


def load_rows(path: str) -> dict[str, list[CorrectionRow]]:
    out: dict[str, list[CorrectionRow]] = {s: [] for s in STAGES}
    with open(path, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            out[d.pop("stage")].append(CorrectionRow(**d))
    return out
