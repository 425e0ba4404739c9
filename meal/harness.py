"""Opening a run, shared by every method: the checks that come before any model is loaded.

A run's files are its record, so nothing here writes one before the launch is known to be good:

- :func:`open_run` decides between a new run and a resume. A new run refuses a folder that holds
  checkpoints; a resume needs one (and says so when there is none), takes the newest *intact*
  checkpoint (naming the newest intact one when the latest is corrupt) and compares the launch's
  configuration with the run's ``config.yaml`` field by field: fields that shape the training
  refuse the resume, fields that only change how it is watched or how long it runs pass.
- :func:`write_run_config` writes ``config.yaml`` once the checkpoint has loaded (a resume) or at
  the start (a new run).
- :func:`load_task_data`, :func:`build_rewards` and :func:`check_policy_source` turn the usual
  mistakes (a malformed data row, a reward that returns NaN or the wrong number of scores, a
  policy folder that does not exist) into one line naming the field or the file, in seconds: each
  reward is tried on two dummy responses before the policy loads.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from meal.checkpoint import CheckpointError, checkpoint_folders, latest_checkpoint, read_checkpoint_state
from meal.config import ConfigError
from meal.rewards import RewardError, RewardSet
from meal.tasks import DataError, TaskData

log = logging.getLogger(__name__)

# fields a resume may change: how long the run goes on, how it is watched, where it runs
RESUME_MAY_CHANGE = ("trainer.iterations", "trainer.resume", "trainer.resume_from", "trainer.log_every",
                     "trainer.table_every", "trainer.save_every", "trainer.keep_checkpoints", "trainer.eval_every",
                     "trainer.eval_prompts", "trainer.final_eval", "trainer.final_eval_prompts", "trainer.out_dir",
                     "logger.", "policy.device", "conditioning.cache", "trainer.stats_cache")
# fields a resume may change with a warning: the same distribution, another random stream
RESUME_WARNS = ("trainer.gen_batch_size", "generation.")


@dataclass
class RunStart:
    """What :func:`open_run` found: the checkpoint to resume from (None: a new run)."""

    run_dir: str
    checkpoint: str | None


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_changes(saved: dict, new: dict) -> tuple[list[str], list[str]]:
    """(refused, warned): the dotted fields whose values differ between two resolved configs, as
    ``field: saved -> new``, split by what a resume may change."""
    a, b = _flat(saved), _flat(new)
    refused, warned = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") == b.get(key, "<unset>") or key.startswith(RESUME_MAY_CHANGE):
            continue
        line = f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}"
        (warned if key.startswith(RESUME_WARNS) else refused).append(line)
    return refused, warned


def open_run(cfg: DictConfig) -> RunStart:
    """Check the run folder against the launch; returns the checkpoint to resume from, if any."""
    t = cfg.trainer
    run_dir = t.out_dir
    if not t.resume:
        if latest_checkpoint(run_dir) is not None or checkpoint_folders(run_dir):
            raise ConfigError(f"trainer.out_dir: {run_dir} already holds a run; set trainer.resume=true to continue "
                              f"it or choose another out_dir (nothing was overwritten)")
        return RunStart(run_dir, None)
    folders = checkpoint_folders(run_dir)
    if not folders:
        raise ConfigError(f"trainer.resume: {run_dir} holds no checkpoint to resume; start it without "
                          f"trainer.resume (nothing was changed)")
    if t.resume_from:
        chosen = os.path.join(run_dir, "checkpoints", t.resume_from)
        if chosen not in folders:
            raise ConfigError(f"trainer.resume_from: {run_dir} has no checkpoint {t.resume_from!r}; it has "
                              f"{[os.path.basename(f) for f in folders]}")
        read_checkpoint_state(chosen)
    else:
        chosen = _newest_intact(run_dir, folders)
    saved_path = os.path.join(run_dir, "config.yaml")
    if os.path.exists(saved_path):
        saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
        refused, warned = config_changes(saved, OmegaConf.to_container(cfg, resolve=True))
        if refused:
            raise ConfigError("trainer.resume: this launch changes what the run was trained with: "
                              + "; ".join(refused) + " (resume with the run's own settings; nothing was changed)")
        for line in warned:
            log.warning("resuming with a changed setting (same method, another random stream): %s", line)
    return RunStart(run_dir, chosen)


def _newest_intact(run_dir: str, folders: list[str]) -> str:
    latest = latest_checkpoint(run_dir)
    try:
        read_checkpoint_state(latest)
        return latest
    except CheckpointError as err:
        intact = None
        for folder in reversed(folders):
            if folder == latest:
                continue
            try:
                read_checkpoint_state(folder)
                intact = folder
                break
            except CheckpointError:
                continue
        hint = (f"; the newest intact one is {os.path.basename(intact)}: resume from it with "
                f"trainer.resume_from={os.path.basename(intact)}" if intact else "; no intact checkpoint is left")
        raise CheckpointError(f"{err}{hint} (nothing was changed)") from err


def write_run_config(run_dir: str, cfg: DictConfig) -> None:
    """The run's ``config.yaml`` (atomically)."""
    os.makedirs(run_dir, exist_ok=True)
    tmp = os.path.join(run_dir, ".config.yaml.tmp")
    OmegaConf.save(cfg, tmp)
    os.replace(tmp, os.path.join(run_dir, "config.yaml"))


def load_task_data(cfg: DictConfig) -> TaskData:
    """The task's data by its ``_target_``; a data error comes out as itself, not wrapped by Hydra."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        data = instantiate(cfg.task.data, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, (DataError, OSError)):
            raise DataError(str(cause)) from cause
        raise DataError(f"task.data: {cause}") from e
    if not data.train or not data.test:
        raise DataError(f"task.data: {cfg.task.name} has {len(data.train)} training and {len(data.test)} test prompts; "
                        f"both must be non-empty")
    return data


def build_rewards(cfg: DictConfig) -> RewardSet:
    """The task's reward set, tried on two dummy responses so that a broken reward fails now, not
    after the policy has loaded and sampled."""
    reward_set = RewardSet.from_config(OmegaConf.to_container(cfg.rewards, resolve=True), list(cfg.task.objectives))
    try:
        reward_set.score(["How do I boil an egg?"] * 2, ["Put it in boiling water for eight minutes.", "Boil it."])
    except RewardError as e:
        raise RewardError(f"{e} (on a dummy response, before the policy was loaded)") from e
    except Exception as e:  # noqa: BLE001 - a user's reward may raise anything; name it
        raise RewardError(f"a reward failed on a dummy response: {type(e).__name__}: {e}") from e
    return reward_set


def check_policy_source(policy: DictConfig) -> None:
    """Fail in one line when ``policy.name_or_path`` / ``policy.gguf_file`` cannot be what they name."""
    path = policy.name_or_path
    if path.startswith("pkg://"):
        from meal.policy import package_folder

        try:
            folder = package_folder(path)
        except FileNotFoundError as e:
            raise ConfigError(f"policy.name_or_path: {e}") from e
    elif os.path.isdir(os.path.expanduser(path)):
        folder = os.path.expanduser(path)
    elif not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) or path.startswith("."):
        raise ConfigError(f"policy.name_or_path: no folder {path!r}")
    else:  # a Hub id
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(path, "config.json"), str):
                raise ConfigError(f"policy.name_or_path: {path!r} is neither a local folder nor in the Hugging Face "
                                  f"cache, and the Hub is offline (HF_HUB_OFFLINE=1)")
        return
    if policy.gguf_file and not os.path.exists(os.path.join(folder, policy.gguf_file)):
        raise ConfigError(f"policy.gguf_file: {folder} has no {policy.gguf_file!r} (set policy.gguf_file=null for a "
                          f"Hugging Face checkpoint folder)")
    if not policy.gguf_file and not os.path.exists(os.path.join(folder, "config.json")):
        raise ConfigError(f"policy.name_or_path: {folder} has no config.json (not a Hugging Face checkpoint; a GGUF "
                          f"file needs policy.gguf_file)")
