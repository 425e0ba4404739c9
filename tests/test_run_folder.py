"""A run folder has one writer, its record starts clean, and a folder from someone else is data, not code:
the run lock, leftovers of a run that died before its first checkpoint, errors that name their place
(a file as out_dir, a full disk, a byte that is not UTF-8), and checkpoints / configs that cannot run code."""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config

from meal.config import ConfigError
from meal.harness.checkpoint import StorageError, UnsafeCheckpoint, read_checkpoint_state, save_checkpoint
from meal.harness.run_folder import LOCK
from meal.harness.saved_run import EvalOptions, evaluate_run
from meal.methods import train
from meal.tasks import DataError, read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESUME = {"trainer.resume": True, "trainer.iterations": 3}


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    """A finished 2-iteration run (checkpoints at 1 and 2); each test copies it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(tiny_llama, str(run), **{"trainer.final_eval": True, "trainer.final_eval_prompts": 1}))
    return run


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _snapshot(folder) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def _lock(run, pid: int) -> None:
    (run / LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "earlier",
                                        "command": "meal-train (the other one)"}))


def test_a_second_writer_is_refused_and_the_first_runs_files_stay_byte_identical(tiny_llama, trained, tmp_path):
    run = _copy(trained, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _lock(run, holder.pid)
        before = _snapshot(run)
        with pytest.raises(ConfigError, match=rf"trainer.out_dir: .*run is in use by process {holder.pid} on "):
            train(tiny_config(tiny_llama, str(run), **RESUME))
        with pytest.raises(ConfigError, match=rf"run_dir: .*run is in use by process {holder.pid}"):
            evaluate_run(str(run), EvalOptions(prompts=1))  # meal-eval writing into a run that is still training
        assert _snapshot(run) == before  # the holder's lock included
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_named_and_taken_over_and_every_exit_releases_the_lock(tiny_llama, trained, tmp_path,
                                                                                 caplog):
    run = _copy(trained, tmp_path / "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lock(run, dead.pid)
    with caplog.at_level("WARNING"):
        train(tiny_config(tiny_llama, str(run), **RESUME))
    assert f"the lock of process {dead.pid}" in caplog.text and "is stale" in caplog.text
    assert (run / "checkpoints" / "latest").read_text() == "step_000003"
    assert not (run / LOCK).exists()
    with pytest.raises(ConfigError, match="trainer.n_samples: 2 -> 3"):  # a refused launch releases it too
        train(tiny_config(tiny_llama, str(run), **{**RESUME, "trainer.iterations": 4, "trainer.n_samples": 3}))
    assert not (run / LOCK).exists()


def test_a_relaunch_after_a_death_before_the_first_checkpoint_starts_a_clean_record(tiny_llama, tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    old = "".join(json.dumps({"step": s, "train/loss": 9.0}) + "\n" for s in (1, 2, 3))
    (run / "metrics.jsonl").write_text(old)
    (run / "config.yaml").write_text("trainer: {seed: 7}\n")
    with caplog.at_level("WARNING"):
        train(tiny_config(tiny_llama, str(run)))
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1, 2]
    aside = [d for d in os.listdir(run) if d.startswith("leftovers-")]
    assert len(aside) == 1 and (run / aside[0] / "metrics.jsonl").read_text() == old  # nothing lost
    assert aside[0] in caplog.text and "metrics.jsonl" in caplog.text


def test_out_dir_that_is_a_file_is_named_in_one_line(tiny_llama, tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    with pytest.raises(ConfigError, match="trainer.out_dir: .*notes.txt is a file, not a folder"):
        train(tiny_config(tiny_llama, str(afile)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", "meal.cli.train", f"trainer.out_dir={afile}", "logger=none"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"meal: invalid configuration: trainer.out_dir: {afile} is a file, not a folder"
    assert afile.read_text() == "mine"


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64")])
def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_the_last_checkpoint_stays(tmp_path, monkeypatch,
                                                                                         failure):
    import meal.harness.checkpoint as ckpt

    run = str(tmp_path / "run")
    save_checkpoint(run, 1, {"w": torch.ones(2)}, None, {})

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(StorageError, match="checkpoint step_000002: no space left on the disk of .*previous "
                                           r"checkpoint \(checkpoints/latest\) is intact"):
        save_checkpoint(run, 2, {"w": torch.zeros(2)}, None, {})
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest", "step_000001"]
    assert open(os.path.join(run, "checkpoints", "latest")).read() == "step_000001"
    monkeypatch.undo()
    assert torch.equal(load_file(os.path.join(run, "checkpoints", "step_000001", "policy.safetensors"))["w"],
                       torch.ones(2))


def test_a_row_that_is_not_utf8_is_named_with_its_file_line_and_column(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n{"text": "also fine"}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl: 1 faulty row\(s\): line 2: byte b'\\xe9' at column 14 "
                                        r"is not UTF-8"):
        read_jsonl(str(bad))


class _RunsCode:
    """A pickle that, loaded unsafely, creates a folder: what a crafted state.pt could do instead."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_state_pt_whose_pickle_would_run_code_is_refused_without_running_it(tiny_llama, trained, tmp_path):
    run = _copy(trained, tmp_path / "run")
    marker = tmp_path / "ran"
    state = run / "checkpoints" / "step_000002" / "state.pt"
    torch.save({"step": 2, "payload": _RunsCode(str(marker))}, state)
    with pytest.raises(UnsafeCheckpoint, match=r"asks to import posix.mkdir.*trainer.trust_run=true"):
        read_checkpoint_state(str(state.parent))
    with pytest.raises(UnsafeCheckpoint, match="posix.mkdir"):  # a resume
        train(tiny_config(tiny_llama, str(run), **RESUME))
    with pytest.raises(UnsafeCheckpoint, match="posix.mkdir"):  # meal-eval
        evaluate_run(str(run), EvalOptions(prompts=1, out_dir=str(tmp_path / "eval")))
    assert not marker.exists()
    read_checkpoint_state(str(state.parent), trust=True)  # the explicit opt-in loads it (and runs it)
    assert marker.exists()


def test_a_checkpoint_with_numpys_old_array_rng_state_still_resumes_bitwise(tiny_llama, trained, tmp_path):
    """Checkpoints written before the numpy RNG state became a list hold an array: read as data (numpy's
    array constructors allowed, nothing else), and the resume continues exactly."""
    import numpy as np

    run = _copy(trained, tmp_path / "run")
    path = run / "checkpoints" / "step_000001" / "state.pt"
    state = torch.load(path, weights_only=True)
    kind, keys, pos, has_gauss, gauss = state["rng"][0]["numpy"]
    state["rng"][0]["numpy"] = (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss)  # the old layout
    torch.save(state, path)
    shutil.rmtree(run / "checkpoints" / "step_000002")
    (run / "checkpoints" / "latest").write_text("step_000001")
    train(tiny_config(tiny_llama, str(run), **{"trainer.resume": True, "trainer.iterations": 2,
                                                "trainer.final_eval": True, "trainer.final_eval_prompts": 1}))
    a = load_file(trained / "checkpoints" / "step_000002" / "policy.safetensors")
    b = load_file(run / "checkpoints" / "step_000002" / "policy.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_meal_eval_refuses_a_run_config_naming_foreign_code_unless_trusted(tiny_llama, trained, tmp_path,
                                                                        monkeypatch):
    run = _copy(trained, tmp_path / "run")
    (tmp_path / "my_rewards.py").write_text("from meal.rewards.embedded import Brevity as MyBrevity\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = (run / "config.yaml").read_text()
    assert "_target_: meal.rewards.embedded.Brevity" in cfg
    (run / "config.yaml").write_text(cfg.replace("meal.rewards.embedded.Brevity", "my_rewards.MyBrevity"))
    with pytest.raises(ConfigError, match=r"names _target_ 'my_rewards.MyBrevity' at rewards.concise, outside "
                                          r"meal's own.*trust_run=true"):
        evaluate_run(str(run), EvalOptions(prompts=1))
    assert not (run / "eval").exists()
    out = evaluate_run(str(run), EvalOptions(prompts=1, batch_size=8, trust=True))  # the user's own reward module
    mine = json.load(open(out["front_json"]))
    theirs = json.load(open(run / "front.json"))
    assert mine["points"] == theirs["points"]  # the same reward under another name: the same front


def test_the_run_closes_its_logger_and_sampler_however_the_recipe_ends():
    """Every recipe runs inside ``with start_run(cfg) as run:``; the run closes the logger (exit code 0 on
    success, 1 on an error or an interrupt) and the vLLM sampler's adapter folder, for every method."""
    from types import SimpleNamespace

    from meal.harness.run import Run

    calls = []
    rec = SimpleNamespace(finish=lambda code: calls.append(("finish", code)), close=lambda: calls.append("close"))
    run = object.__new__(Run)
    run.logger, run.policy = rec, SimpleNamespace(settings=SimpleNamespace(sampler=rec))
    with pytest.raises(KeyboardInterrupt):
        with run:
            raise KeyboardInterrupt
    assert calls == [("finish", 1), "close"]
    calls.clear()
    with run:
        pass
    assert calls == [("finish", 0), "close"]
    import inspect

    import meal.methods as methods

    for name in methods.BUILTIN:
        source = inspect.getsource(methods.get(name).train)
        assert "with start_run(" in source and "logger.finish" not in source, name
