"""A run folder's rules: one process writes it at a time (:func:`run_lock`), a fresh start in a folder that a
run left without a checkpoint moves the leftovers aside (:func:`move_leftovers`), and a finished run is read
as data (:func:`read_run`: its config and checkpoint folder, refusing code it would import) and loaded
(:func:`load_run`, :func:`load_run_responder`) by every command that opens one (meal-eval, meal-generate,
meal-export, MetaAligner's stacking)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time

from typing import Any

from omegaconf import OmegaConf

from meal.config import DTYPES, ConfigError, TrainConfig, typed_method

log = logging.getLogger(__name__)

LOCK = ".lock"  # in a run folder: who writes it now (JSON: pid, host, since, command)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def run_lock(run_dir: str, field: str = "trainer.out_dir"):
    """One writer per run folder: a lock file taken before anything is written (atomically: O_EXCL), holding
    the process id, host, time and command; released on every exit (success, error, interrupt). A second
    launch while the holder lives is refused in one line naming the folder and the holder; a lock left by
    a dead process on this host (kill -9) is named in the log and taken over. Under a distributed launch
    rank 0 holds it for every rank. ``field``: the setting that named the folder, for the message."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"{field}: {run_dir} is a file, not a folder")
    created = not os.path.exists(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(sys.argv)[:300]}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    holder = json.load(f)
            except (OSError, ValueError):  # being written this instant, or garbage
                holder = {}
            pid, host = holder.get("pid"), holder.get("host")
            if isinstance(pid, int) and host == me["host"] and not _alive(pid):
                log.warning("%s: the lock of process %d (%s, since %s) is stale, that process is gone; taking it over",
                            run_dir, pid, host, holder.get("since"))
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            raise ConfigError(f"{field}: {run_dir} is in use by process {pid} on {host} since {holder.get('since')} "
                              f"({holder.get('command', '?')}); wait for it to end or choose another folder (nothing "
                              f"was written; if that process is gone, delete {path})")
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            with open(path) as f:
                mine = json.load(f).get("pid") == me["pid"]
            if mine:
                os.remove(path)
            if created and not os.listdir(run_dir):  # a launch refused before it wrote anything leaves no folder
                os.rmdir(run_dir)


def move_leftovers(run_dir: str) -> None:
    """A new run in a folder that holds files but no checkpoint (a run that died before its first one): its
    files (metrics.jsonl, config.yaml ...) are moved aside into ``leftovers-<time>/``, named in the log, so
    that the new run's record starts clean and nothing is lost. Hydra's per-launch folders and the lock stay."""
    if not os.path.isdir(run_dir):
        return
    found = sorted(n for n in os.listdir(run_dir) if n not in ("hydra", LOCK) and not n.startswith("leftovers-"))
    if not found:
        return
    aside = os.path.join(run_dir, f"leftovers-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(aside, exist_ok=True)
    for name in found:
        os.replace(os.path.join(run_dir, name), os.path.join(aside, name))
    log.warning("%s held %s but no checkpoint (a run that ended before its first one): moved to %s; this run "
                "starts fresh", run_dir, ", ".join(found), aside)


def foreign_targets(node: Any, path: str = "") -> list[tuple[str, str]]:
    """(field, target) of every ``_target_`` in a config container that is not meal's own (``meal.``)."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            where = f"{path}.{k}" if path else str(k)
            if k == "_target_" and isinstance(v, str) and not v.startswith("meal."):
                found.append((path or "<top>", v))
            else:
                found += foreign_targets(v, where)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += foreign_targets(v, f"{path}[{i}]")
    return found


def read_run(run_dir: str, checkpoint: str = "latest", untrained: bool = False, trust: bool = False):
    """(cfg, weights folder) of a run written by meal-train, before any model loads: its config.yaml with
    the method typed, and the folder of ``checkpoint`` (latest | conditioned | a checkpoint name; None
    when ``untrained``). A run folder is data: a config that names a ``_target_`` outside meal's own (a
    callable that opening the run would import and call) is refused, naming it, unless ``trust``."""
    from meal.checkpoint import latest_checkpoint

    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(cfg_path):
        raise ConfigError(f"run_dir: {run_dir} has no config.yaml (not a folder written by meal-train)")
    raw = OmegaConf.load(cfg_path)
    foreign = foreign_targets(OmegaConf.to_container(raw, resolve=False))
    if foreign and not trust:
        field, target = foreign[0]
        raise ConfigError(f"run_dir: {cfg_path} names _target_ {target!r} at {field}, outside meal's own: opening "
                          f"the run would import and call it. If you trust the folder (your own reward module), "
                          f"pass trust_run=true")
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), raw)
    cfg.method = typed_method(cfg.method)
    folder = None
    if not untrained:
        if checkpoint == "conditioned":  # the run's starting point: the conditioning stage's policy
            folder = os.path.join(run_dir, "conditioning")
            if not os.path.exists(os.path.join(folder, "policy.safetensors")):
                raise ConfigError(f"checkpoint: {run_dir} ran no conditioning stage (no conditioning/)")
        elif checkpoint == "latest":
            folder = latest_checkpoint(run_dir)
        else:
            folder = os.path.join(run_dir, "checkpoints", checkpoint)
        if folder is None or not os.path.isdir(folder):
            raise ConfigError(f"checkpoint: {run_dir} has no checkpoint {checkpoint!r}")
    return cfg, folder


def load_run(run_dir: str, checkpoint: str = "latest", untrained: bool = False, trust: bool = False,
             dtype: str | None = None):
    """(cfg, model, tokenizer, weights folder) of a run written by meal-train (:func:`read_run`), the policy
    with the weights of ``checkpoint`` loaded, or none (``untrained``); ``dtype`` (float32, bfloat16, ...)
    replaces the run's ``policy.dtype`` (None: the run's own)."""
    from meal.checkpoint import load_policy_weights
    from meal.policy import load_policy, trainable_parameters

    cfg, folder = read_run(run_dir, checkpoint, untrained, trust)
    if dtype is not None:
        check_dtype(dtype)
        cfg.policy.dtype = dtype
    model, tok = load_policy(cfg.policy, len(cfg.task.objectives))
    if folder is not None:
        load_policy_weights(folder, trainable_parameters(model))
    return cfg, model, tok, folder


def check_dtype(dtype: str) -> None:
    """A ``dtype=`` option of meal-generate / meal-export: one of policy.dtype's values, else ConfigError."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: {' | '.join(DTYPES)}, got {dtype!r}")


def load_run_responder(run_dir: str, checkpoint: str = "latest"):
    """How a trained run answers under a preference (its method's responder, its latest weights): what
    another method (MetaAligner's corrector) can be stacked on."""
    from meal.methods import recipe

    cfg, model, tok, _ = load_run(run_dir, checkpoint)
    responder = recipe(cfg.method.recipe).responder(cfg, model, tok, run_dir)
    if getattr(responder, "grid", None) is not None:
        raise ConfigError(f"stack_on: {run_dir} is a {cfg.method.recipe} run, whose policies answer only their own "
                          f"grid preferences; stack on a run that answers any preference")
    return responder
