"""A run folder's writer rules: one process writes it at a time (:func:`run_lock`), a fresh start in a folder
that a run left without a checkpoint moves the leftovers aside (:func:`move_leftovers`), and a config naming
code outside meal's own is found (:func:`foreign_targets`) before a folder is opened as data
(:mod:`meal.harness.saved_run`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from typing import Any

from meal.config import ConfigError

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
