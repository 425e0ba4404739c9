"""Task data: the prompts a task trains and evaluates on.

Every loader returns a :class:`TaskData` of :class:`Example` rows: ``text`` is the task input a
reward sees as its "prompt" (a user request, a dialogue, a post), before any template. Loaders are
chosen by ``task.data._target_``:

- :func:`load_embedded`: the prompts this project ships (``assistant``: user requests,
  ``summary``: short passages), written for meal, with a fixed train/test split.
- :func:`load_jsonl`: a user's own prompts, one JSON object per line with a ``text`` field.
- :func:`load_hh_rlhf` and :func:`load_summarize_from_feedback`: the paper's data sets
  (``Anthropic/hh-rlhf``, ``openai/summarize_from_feedback``) with the filters of method.md.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Iterable, Optional


class DataError(ValueError):
    """A data file or row is malformed; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """One prompt: a stable id and the task text."""

    id: str
    text: str


@dataclass(frozen=True)
class Response:
    """A response the data set itself holds for a training prompt (``group``: the prompt's id)."""

    group: str
    text: str
    response: str


@dataclass
class TaskData:
    """Train and test prompts of a task; ``responses``: the data set's own responses to training
    prompts, where it has them (the conditioning stage's corpus), else None; ``validation``: prompts
    held out of the training split by :meth:`hold_out` (empty until then)."""

    train: list[Example]
    test: list[Example]
    responses: Optional[list[Response]] = None
    validation: list[Example] = field(default_factory=list)

    def split(self, name: str) -> list[Example]:
        """The prompts of ``name``: train | validation | test."""
        if name not in ("train", "validation", "test"):
            raise ValueError(f"unknown split {name!r}: train | validation | test")
        return getattr(self, name)

    def hold_out(self, n: int, seed: int = 20261202) -> "TaskData":
        """Move ``n`` training prompts (at most a quarter of them) to ``validation``: a seeded choice that
        depends on the task alone, so every run and seed of a task holds out the same prompts. Their
        own responses leave the conditioning corpus with them. The training order is kept."""
        n = min(n, len(self.train) // 4)
        chosen = set(random.Random(seed).sample(range(len(self.train)), n))
        val = [e for i, e in enumerate(self.train) if i in chosen]
        ids = {e.id for e in val}
        responses = None if self.responses is None else [r for r in self.responses if r.group not in ids]
        return TaskData([e for i, e in enumerate(self.train) if i not in chosen], self.test, responses, val)


DATA_DIR = os.path.join(os.path.dirname(__file__), "data")


def read_jsonl(path: str, text_key: str = "text", max_errors: int = 20) -> list[Example]:
    """Rows ``{"id": ..., "text": ...}`` (id optional: the line number). Every faulty row (up to
    ``max_errors``) is reported in one DataError, each with its line."""
    rows, seen, errors = [], set(), []
    try:
        f = open(path, "rb")  # decoded line by line: a byte that is not UTF-8 is named with its line
    except OSError as e:
        raise DataError(f"cannot open prompt file {path}: {e}") from e
    with f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                errors.append(f"line {n}: byte {raw[e.start:e.start + 1]!r} at column {e.start + 1} is not UTF-8 "
                              f"(save the file as UTF-8)")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"line {n}: not valid JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                errors.append(f"line {n}: expected a JSON object, got {type(row).__name__}")
                continue
            text = row.get(text_key)
            if not isinstance(text, str) or not text.strip():
                keys = f" (the row has {sorted(row)[:6]}; set task.data.text_key)" if text_key not in row else ""
                errors.append(f"line {n}: field {text_key!r} must be a non-empty string{keys}")
                continue
            ex_id = str(row.get("id", f"{os.path.basename(path)}:{n}"))
            if ex_id in seen:
                errors.append(f"line {n}: duplicate id {ex_id!r}")
                continue
            seen.add(ex_id)
            rows.append(Example(ex_id, text.strip()))
    if errors:
        more = f" (and {len(errors) - max_errors} more)" if len(errors) > max_errors else ""
        raise DataError(f"{path}: {len(errors)} faulty row(s): " + "; ".join(errors[:max_errors]) + more)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def load_embedded(name: str) -> TaskData:
    """The shipped prompts: ``assistant`` (user requests) or ``summary`` (passages to summarise)."""
    if name not in ("assistant", "summary"):
        raise DataError(f"unknown embedded task {name!r}: assistant | summary")
    return TaskData(read_jsonl(os.path.join(DATA_DIR, f"{name}_train.jsonl")),
                    read_jsonl(os.path.join(DATA_DIR, f"{name}_test.jsonl")))


def load_jsonl(train_file: str, test_file: Optional[str] = None, test_fraction: float = 0.2,
               text_key: str = "text", seed: int = 0) -> TaskData:
    """A user's own prompts; without ``test_file`` a seeded ``test_fraction`` is held out."""
    train = read_jsonl(train_file, text_key)
    if test_file is not None:
        return TaskData(train, read_jsonl(test_file, text_key))
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_test = max(1, int(round(len(train) * test_fraction)))
    if n_test >= len(train):
        raise DataError(f"{train_file}: {len(train)} rows are too few to hold out a test split")
    test_idx = set(order[:n_test])
    return TaskData([e for i, e in enumerate(train) if i not in test_idx],
                    [e for i, e in enumerate(train) if i in test_idx])


def _load_hf(path: str, name: Optional[str], split: str, data_files: Optional[dict]):
    import datasets

    if data_files:  # local files in the data set's schema (tests, mirrors)
        fmt = "json" if str(data_files[split]).endswith(("json", "jsonl")) else "parquet"
        return datasets.load_dataset(fmt, data_files={split: data_files[split]}, split=split)
    return datasets.load_dataset(path, name, split=split)


def hh_prompt(dialogue: str) -> str:
    """The dialogue up to and including the last ``"\\n\\nAssistant:"`` (the response is cut off)."""
    return hh_split(dialogue)[0]


def hh_split(dialogue: str) -> tuple[str, str]:
    """(prompt, final Assistant turn) of an hh-rlhf dialogue."""
    marker = "\n\nAssistant:"
    cut = dialogue.rfind(marker)
    if cut < 0:
        raise DataError(f"hh-rlhf row has no Assistant turn: {dialogue[:60]!r}")
    return dialogue[:cut + len(marker)].strip(), dialogue[cut + len(marker):].strip()


def load_hh_rlhf(path: str = "Anthropic/hh-rlhf", data_files: Optional[dict] = None,
                 max_train: Optional[int] = None, max_test: Optional[int] = None) -> TaskData:
    """Helpful Assistant prompts (method.md): train: the dialogue before every last Assistant turn,
    from chosen and rejected (deduplicated); test: every 4th example of the test split.
    ``responses``: the final Assistant turn of chosen and of rejected, for every training prompt kept."""

    def pairs(rows: Iterable[dict], where: str) -> list[tuple[str, str]]:
        out = []
        for n, row in enumerate(rows):
            for key in ("chosen", "rejected"):
                if not isinstance(row.get(key), str):
                    raise DataError(f"{where} row {n}: field {key!r} missing or not a string")
                out.append(hh_split(row[key]))
        return out

    train_pairs = pairs(_load_hf(path, None, "train", data_files), f"{path}:train")
    test_rows = _load_hf(path, None, "test", data_files)
    train = _dedupe([p for p, _ in train_pairs], "hh-train")[:max_train]
    ids = {e.text: e.id for e in train}
    responses = [Response(ids[p], p, r) for p, r in train_pairs if p in ids and r]
    test_src = [row for i, row in enumerate(test_rows) if i % 4 == 0]
    test = _dedupe([hh_prompt(r["chosen"]) for r in test_src], "hh-test")[:max_test]
    return TaskData(train, test, responses)


def load_summarize_from_feedback(path: str = "openai/summarize_from_feedback", name: str = "comparisons",
                                 data_files: Optional[dict] = None, min_chars: int = 100, max_chars: int = 1200,
                                 max_train: Optional[int] = None, max_test: int = 2000) -> TaskData:
    """Reddit Summary posts (method.md): posts of ``min_chars``-``max_chars`` characters,
    deduplicated by post id; test: the validation split, deduplicated, the first ``max_test``.
    ``responses``: both summaries of every comparison of a kept training post (deduplicated)."""

    def posts(rows: Iterable[dict], where: str, summaries: list | None = None) -> list[Example]:
        out, seen, said = [], set(), set()
        for n, row in enumerate(rows):
            info = row.get("info")
            if not isinstance(info, dict) or not isinstance(info.get("post"), str) or "id" not in info:
                raise DataError(f"{where} row {n}: expected info.id and info.post")
            post = info["post"].strip()
            if not min_chars <= len(post) <= max_chars:
                continue
            if summaries is not None:
                for s in row.get("summaries") or []:
                    text = s.get("text") if isinstance(s, dict) else None
                    if isinstance(text, str) and text.strip() and (info["id"], text.strip()) not in said:
                        said.add((info["id"], text.strip()))
                        summaries.append(Response(str(info["id"]), post, text.strip()))
            if info["id"] in seen:
                continue
            seen.add(info["id"])
            out.append(Example(str(info["id"]), post))
        return out

    found: list[Response] = []
    train = posts(_load_hf(path, name, "train", data_files), f"{path}:train", found)[:max_train]
    kept = {e.id for e in train}
    test = posts(_load_hf(path, name, "validation", data_files), f"{path}:validation")[:max_test]
    return TaskData(train, test, [r for r in found if r.group in kept])


def _dedupe(texts: list[str], prefix: str) -> list[Example]:
    seen, out = set(), []
    for t in texts:
        if t not in seen:
            seen.add(t)
            out.append(Example(f"{prefix}-{len(out)}", t))
    return out
