"""Checkpoints: trainable weights as safetensors, optimiser and RNG state, written atomically.

Layout of ``<run_dir>/checkpoints/``::

    step_000010/policy.safetensors   trainable policy parameters (LoRA adapters or all weights)
    step_000010/net.safetensors      the preference-weight-net (Meal only)
    step_000010/state.pt             optimiser states, RNG states, step, data-order state
    latest                           name of the newest complete checkpoint

``state.pt`` holds tensors, numbers, strings, lists and dicts only, and is read with
``torch.load(weights_only=True)``: a run folder passed around is data, and a crafted ``state.pt``
cannot run code when it is resumed or evaluated. Checkpoints written before this held numpy's RNG state
as an array; they are read through an allow-list of numpy's array constructors (no code runs either);
anything else a pickle asks to import is refused, naming it, unless the caller trusts the folder
(``trust``: ``trainer.trust_run`` / ``meal-eval trust_run``).

A checkpoint folder is written under a temporary name, its files and the folder flushed to disk
(fsync), and renamed when complete; ``latest`` is replaced atomically afterwards (also flushed), so
neither a crash nor a power loss mid-write leaves a half checkpoint as latest, and the previous one
is never removed first. Temporary folders that a killed write left behind are removed by the next
save.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
import tempfile
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable; the message names the file."""


class UnsafeCheckpoint(CheckpointError):
    """A state.pt whose pickle asks to import something no checkpoint of meal holds (it could run code)."""


class StorageError(RuntimeError):
    """A checkpoint could not be written (the disk is full, ...); the previous checkpoint is intact."""


def rng_state() -> dict[str, Any]:
    """The random states of python, numpy (as a list: no array in state.pt) and torch."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str, step: int, policy_params: dict[str, torch.Tensor],
                    net: torch.nn.Module | None, state: dict[str, Any], keep: int = 2,
                    rng: list[dict[str, Any]] | None = None) -> str:
    """Write checkpoint ``step`` and point ``latest`` at it; keep the newest ``keep``. Returns its folder.

    ``rng``: the random states of every data-parallel rank, in rank order (default: this process's).
    """
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    for leftover in os.listdir(root):  # temporary folders of writes that were killed
        if leftover.startswith(".step_"):
            shutil.rmtree(os.path.join(root, leftover), ignore_errors=True)
    name = f"step_{step:06d}"
    try:
        tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=root)
    except OSError as e:
        raise _storage_error(e, name, root) or e
    try:
        save_file({n: p.detach().contiguous().cpu() for n, p in policy_params.items()},
                  os.path.join(tmp, "policy.safetensors"))
        if net is not None:
            save_file({n: p.detach().contiguous().cpu() for n, p in net.state_dict().items()},
                      os.path.join(tmp, "net.safetensors"))
        torch.save({**state, "step": step, "rng": rng or [rng_state()]}, os.path.join(tmp, "state.pt"))
        for f in os.listdir(tmp):
            _fsync(os.path.join(tmp, f))
        _fsync(tmp)
        final = os.path.join(root, name)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = os.path.join(root, ".latest.tmp")
        with open(latest_tmp, "w") as f:
            f.write(name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest_tmp, os.path.join(root, "latest"))
        _fsync(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _storage_error(e, name, root) or e
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def _storage_error(e: BaseException, name: str, root: str) -> StorageError | None:
    """A failed checkpoint write as one line when the disk is full (ENOSPC, or torch's short-write error)."""
    full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or (
        isinstance(e, RuntimeError) and ("No space left" in str(e) or "unexpected pos" in str(e)))
    if not full:
        return None
    return StorageError(f"checkpoint {name}: no space left on the disk of {root}; the previous checkpoint "
                        f"(checkpoints/latest) is intact: free space, then continue with trainer.resume=true")


def _fsync(path: str) -> None:
    """Flush a file or a folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# what a checkpoint written before the numpy RNG state became a list holds besides plain data: numpy's own
# array constructors, which build arrays and call nothing else
_OLD_NUMPY = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
              (getattr(np, "_core", None) or np.core).multiarray._reconstruct]


# the data classes DeepSpeed's ZeRO optimiser state holds (a run under the DeepSpeed launch saves it): its stage
# (an Enum), its loss scaler's settings and its fragment addresses (a named tuple); rebuilding them sets fields
DEEPSPEED_STATE = ("deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                   "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                   "deepspeed.utils.tensor_fragment.fragment_address")


def _data_class(name: str):
    """The class a checkpoint may name besides plain data (one of DEEPSPEED_STATE, when DeepSpeed is
    installed); None for anything else."""
    import importlib

    if name not in DEEPSPEED_STATE:
        return None
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None


def load_state(path: str, trust: bool = False) -> dict[str, Any]:
    """``state.pt`` read as data (``weights_only``; numpy's array constructors allowed for old checkpoints,
    DeepSpeed's Enums for its optimiser state); a pickle that asks for anything else is refused with
    UnsafeCheckpoint naming it, unless ``trust``."""
    if trust:
        return torch.load(path, weights_only=False)
    try:
        with torch.serialization.safe_globals(_OLD_NUMPY):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            asked = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - not even a readable archive
            asked = []
        numpy_ok = [g for g in asked if g.startswith(("numpy.", "numpy._core.", "numpy.core."))
                    and g.endswith(("ndarray", "dtype", "UInt32DType", "_reconstruct"))]
        classes = {g: _data_class(g) for g in asked if g not in numpy_ok}
        foreign = [g for g, c in classes.items() if c is None]
        if foreign:
            raise UnsafeCheckpoint(f"{path} asks to import {', '.join(foreign[:3])}, which no checkpoint of meal "
                                   f"holds; loading it could run code, so it was not loaded. If you wrote this "
                                   f"folder yourself and trust it, pass trainer.trust_run=true (meal-eval: "
                                   f"trust_run=true)") from e
        if not classes:  # not a pickle meal wrote (garbage, a truncated file): torch's long advice says nothing
            detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if str(e) else "?"
            raise CheckpointError(f"unreadable pickle ({detail})") from e
        with torch.serialization.safe_globals(_OLD_NUMPY + list(classes.values())):
            return torch.load(path, weights_only=True)


def checkpoint_folders(run_dir: str) -> list[str]:
    """The complete checkpoint folders of a run, oldest first (temporary ones excluded)."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, d) for d in sorted(os.listdir(root)) if d.startswith("step_")]


def read_checkpoint_state(folder: str, trust: bool = False) -> dict[str, Any]:
    """Read a checkpoint's ``state.pt`` (as data: :func:`load_state`) and check its weight files open;
    CheckpointError naming the file."""
    from safetensors import safe_open

    for name in ("policy.safetensors", "net.safetensors"):
        path = os.path.join(folder, name)
        if name == "net.safetensors" and not os.path.exists(path):
            continue
        try:
            with safe_open(path, framework="pt") as f:
                list(f.keys())
        except Exception as e:  # noqa: BLE001 - any unreadable file is a corrupt checkpoint
            raise CheckpointError(f"checkpoint {folder} is corrupt or incomplete: {name}: {e}") from e
    try:
        return load_state(os.path.join(folder, "state.pt"), trust)
    except UnsafeCheckpoint:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {folder} is corrupt or incomplete: state.pt: {e}") from e


def latest_checkpoint(run_dir: str) -> str | None:
    """Folder of the newest complete checkpoint, or None when the run has none."""
    pointer = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        folder = os.path.join(run_dir, "checkpoints", f.read().strip())
    if not os.path.isdir(folder):
        raise CheckpointError(f"{pointer} names {folder}, which does not exist")
    return folder


def load_checkpoint(folder: str, policy_params: dict[str, torch.Tensor], net: torch.nn.Module | None,
                    rank: int = 0, trust: bool = False) -> dict[str, Any]:
    """Copy the saved weights into ``policy_params`` (and ``net``), restore RNG; return the state dict.

    The random state restored is rank ``rank``'s, or rank 0's when the checkpoint was written by
    fewer processes (``state["rng"]`` lists one per rank).
    """
    load_policy_weights(folder, policy_params)
    try:
        state = load_state(os.path.join(folder, "state.pt"), trust)
        if net is not None:
            net.load_state_dict(load_file(os.path.join(folder, "net.safetensors")))
        if isinstance(state["rng"], dict):  # written before per-rank states were kept
            state["rng"] = [state["rng"]]
        set_rng_state(state["rng"][rank if rank < len(state["rng"]) else 0])
    except UnsafeCheckpoint:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is a corrupt checkpoint
        raise CheckpointError(f"checkpoint {folder} is corrupt or incomplete: {e}") from e
    return state


def load_policy_weights(folder: str, policy_params: dict[str, torch.Tensor]) -> None:
    """Copy the saved trainable weights into ``policy_params`` (names and shapes must match)."""
    try:
        saved = load_file(os.path.join(folder, "policy.safetensors"))
    except Exception as e:  # noqa: BLE001 - any unreadable file is a corrupt checkpoint
        raise CheckpointError(f"checkpoint {folder}/policy.safetensors is corrupt or unreadable: {e}") from e
    missing = sorted(set(policy_params) - set(saved))
    unexpected = sorted(set(saved) - set(policy_params))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {folder} does not match the policy: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]} (different LoRA settings or model?)")
    with torch.no_grad():
        for n, p in policy_params.items():
            if saved[n].shape != p.shape:
                raise CheckpointError(f"checkpoint {folder}: {n} has shape {tuple(saved[n].shape)}, "
                                      f"the policy {tuple(p.shape)}")
            p.copy_(saved[n].to(p.dtype))
