"""Run logging: W&B (offline when no key is set) or nothing, plus a local ``metrics.jsonl`` always.

The training loop calls the same methods whatever the backend (as nanochat's ``DummyWandb``):
``log(metrics, step)``, ``log_table(key, columns, rows, step)``, ``log_image(key, path, step)``
and ``finish()``. Metric names carry a namespace: ``train/...``, ``reward/<name>``, ``meta/...``,
``weights/<objective>``, ``eval/...``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)


class NullLogger:
    """Logs nothing beyond metrics.jsonl."""

    def __init__(self, **_: Any):
        pass

    def start(self, run_dir: str, config: Mapping[str, Any], name: str, resume: bool) -> None:
        pass

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        pass

    def log_image(self, key: str, path: str, step: int) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbLogger(NullLogger):
    """Weights & Biases. ``mode: auto`` runs offline unless WANDB_API_KEY is set (``wandb sync`` later)."""

    def __init__(self, project: str = "meal", mode: str = "auto", name: str | None = None,
                 group: str | None = None, **_: Any):
        self.project, self.mode, self.name, self.group = project, mode, name, group
        self.run = None

    def start(self, run_dir, config, name, resume):
        import wandb

        mode = self.mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        id_file = os.path.join(run_dir, "wandb_id.txt")
        run_id = open(id_file).read().strip() if resume and os.path.exists(id_file) else None
        self.run = wandb.init(project=self.project, name=self.name or name, group=self.group, dir=run_dir,
                              config=dict(config), mode=mode, id=run_id, resume="allow" if run_id else None)
        with open(id_file, "w") as f:
            f.write(self.run.id)
        log.info("W&B run %s (%s) in %s", self.run.id, mode, run_dir)

    def log(self, metrics, step):
        self.run.log(dict(metrics), step=step)

    def log_table(self, key, columns, rows, step):
        import wandb

        self.run.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])}, step=step)

    def log_image(self, key, path, step):
        import wandb

        self.run.log({key: wandb.Image(path)}, step=step)

    def finish(self, exit_code=0):
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


@dataclass(frozen=True)
class LoggerSpec:
    """The run's tracker: ``target`` (the ``logger`` node, ``_target_`` and its fields, as a plain dict),
    the config it records (``record``) and its name (``name``; the conditioning stage's own run:
    ``stage_name``)."""

    target: dict
    record: dict
    name: str
    stage_name: str


def open_logger(spec: LoggerSpec, run_dir: str, resume: bool, stage: bool = False) -> NullLogger:
    """Instantiate the run's tracker (``logger._target_``) and start it. ``stage``: the conditioning stage's
    own run (its ``warmup/*`` metrics have their own steps; it is shared by every run of the task)."""
    from hydra.utils import instantiate

    logger = instantiate(spec.target)
    logger.start(run_dir, spec.record, spec.stage_name if stage else spec.name, resume)
    return logger


class JsonlWriter:
    """Appends one JSON object per logged step to ``<run_dir>/metrics.jsonl`` (flushed each time)."""

    def __init__(self, path: str):
        self.path = path

    def write(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> int:
        """Drop the records of steps after ``step`` (a resumed run does them again); returns how many.
        A torn last line (a write killed half-way) is dropped too."""
        if not os.path.exists(self.path):
            return 0
        kept, dropped = [], 0
        with open(self.path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    dropped += 1
                    continue
                if record.get("step", 0) > step:
                    dropped += 1
                else:
                    kept.append(line if line.endswith("\n") else line + "\n")
        if dropped:
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
        return dropped
