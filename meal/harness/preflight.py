"""The checks that come before any model is loaded, when a run opens (:func:`meal.harness.run.start_run`).

A run's files are its record, so nothing here writes one before the launch is known to be good:

- :func:`resume_point` decides between a new run and a resume. A new run refuses a folder that holds
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
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from meal.config import ConfigError
from meal.harness.checkpoint import (CheckpointError, UnsafeCheckpoint, checkpoint_folders, latest_checkpoint,
                                     read_checkpoint_state)
from meal.harness.run_folder import move_leftovers
from meal.rewards import RewardError, RewardSet
from meal.tasks import DataError, TaskData

if TYPE_CHECKING:
    from meal.harness.settings import ResumeSpec

log = logging.getLogger(__name__)

# fields a resume may change: how long the run goes on, how it is watched, where it runs
RESUME_MAY_CHANGE = ("trainer.iterations", "trainer.resume", "trainer.resume_from", "trainer.trust_run",
                     "trainer.log_every",
                     "trainer.table_every", "trainer.save_every", "trainer.keep_checkpoints", "trainer.eval_every",
                     "trainer.eval_prompts", "trainer.final_eval", "trainer.final_eval_prompts", "trainer.out_dir",
                     "logger.", "policy.device", "conditioning.cache", "trainer.stats_cache")
# fields a resume may change with a warning: the same distribution, another random stream
RESUME_WARNS = ("trainer.gen_batch_size", "generation.")


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


def resume_point(run_dir: str, t: ResumeSpec, resolved: dict) -> str | None:
    """Check the run folder against the launch (``resolved``: its config as a plain dict); returns the
    checkpoint to resume from (None: a new run)."""
    if not t.resume:
        if checkpoint_folders(run_dir) or os.path.exists(os.path.join(run_dir, "checkpoints", "latest")):
            raise ConfigError(f"trainer.out_dir: {run_dir} already holds a run; set trainer.resume=true to continue "
                              f"it or choose another out_dir (nothing was overwritten)")
        move_leftovers(run_dir)
        return None
    folders = checkpoint_folders(run_dir)
    if not folders:
        raise ConfigError(f"trainer.resume: {run_dir} holds no checkpoint to resume; start it without "
                          f"trainer.resume (nothing was changed)")
    if t.resume_from:
        chosen = os.path.join(run_dir, "checkpoints", t.resume_from)
        if chosen not in folders:
            raise ConfigError(f"trainer.resume_from: {run_dir} has no checkpoint {t.resume_from!r}; it has "
                              f"{[os.path.basename(f) for f in folders]}")
        read_checkpoint_state(chosen, t.trust_run)
    else:
        chosen = _newest_intact(run_dir, folders, t.trust_run)
    saved_path = os.path.join(run_dir, "config.yaml")
    if os.path.exists(saved_path):
        saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
        refused, warned = config_changes(saved, resolved)
        if refused:
            raise ConfigError("trainer.resume: this launch changes what the run was trained with: "
                              + "; ".join(refused) + " (resume with the run's own settings; nothing was changed)")
        for line in warned:
            log.warning("resuming with a changed setting (same method, another random stream): %s", line)
    return chosen


def _pointer(run_dir: str) -> str:
    """The checkpoint name ``checkpoints/latest`` holds (empty when it is missing)."""
    path = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read().strip()


def _newest_intact(run_dir: str, folders: list[str], trust: bool = False) -> str:
    try:
        latest = latest_checkpoint(run_dir) or folders[-1]  # no pointer: killed between the rename and it
        read_checkpoint_state(latest, trust)
        return latest
    except UnsafeCheckpoint:
        raise
    except CheckpointError as err:
        intact = None
        for folder in reversed(folders):
            if folder == os.path.join(run_dir, "checkpoints", _pointer(run_dir)):
                continue
            try:
                read_checkpoint_state(folder, trust)
                intact = folder
                break
            except CheckpointError:
                continue
        hint = (f"; the newest intact one is {os.path.basename(intact)}: resume from it with "
                f"trainer.resume_from={os.path.basename(intact)}" if intact else "; no intact checkpoint is left")
        raise CheckpointError(f"{err}{hint} (nothing was changed)") from err


def write_run_config(run_dir: str, config_yaml: str) -> None:
    """The run's ``config.yaml`` (atomically)."""
    os.makedirs(run_dir, exist_ok=True)
    tmp = os.path.join(run_dir, ".config.yaml.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(config_yaml)
    os.replace(tmp, os.path.join(run_dir, "config.yaml"))


def load_task_data(task: DictConfig) -> TaskData:
    """The task's data by its ``_target_`` (``task``: the config's task node); a data error comes out as
    itself, not wrapped by Hydra."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        data = instantiate(task.data, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, (DataError, OSError)):
            raise DataError(str(cause)) from cause
        raise DataError(f"task.data: {cause}") from e
    if not data.train or not data.test:
        raise DataError(f"task.data: {task.name} has {len(data.train)} training and {len(data.test)} test prompts; "
                        f"both must be non-empty")
    return data.hold_out(task.validation_prompts)


def build_rewards(rewards: dict, objectives: list[str]) -> RewardSet:
    """The task's reward set (``rewards``: the resolved ``rewards`` node), tried on two dummy responses so
    that a broken reward fails now, not after the policy has loaded and sampled."""
    reward_set = RewardSet.from_config(rewards, list(objectives))
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
        from meal.policy.model import package_folder

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


def log_cut_prompts(condition, texts: list[str], num_objectives: int, tokenizer, max_tokens: int) -> int:
    """Log once how many prompts (as conditioned, at a uniform preference) are longer than
    ``trainer.max_prompt_tokens`` and so lose their beginning (prompts are cut from the left); returns it."""
    if not texts or not callable(condition):
        return 0
    try:
        written = condition(texts, torch.full((len(texts), num_objectives), 1.0 / num_objectives))
    except Exception:  # noqa: BLE001 - a conditioner that needs more than a preference (RiC: scores)
        written = texts
    cut = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) > max_tokens for p in written)
    if cut:
        log.warning("%d of %d prompts are longer than trainer.max_prompt_tokens = %d tokens: their beginning is cut",
                    cut, len(texts), max_tokens)
    return cut
