"""The real entry points in a subprocess with a tiny budget (as a user runs them)."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def tiny_overrides(model_dir, out_dir):
    return [f"policy.name_or_path={model_dir}", "policy.gguf_file=null", "policy.dtype=float32",
            "policy.lora.enabled=false", "task.max_new_tokens=6", "trainer.iterations=2", "trainer.batch_size=4",
            "trainer.n_samples=2", "trainer.micro_batch_size=4", "trainer.norm_prompts=4",
            "trainer.final_eval_prompts=2", f"trainer.out_dir={out_dir}", "logger=none",
            "trainer.stats_cache=null", "conditioning.steps=4", "conditioning.pool_prompts=4",
            "conditioning.batch_size=4", "conditioning.micro_batch_size=2", "conditioning.save_every=2",
            "conditioning.cache=null",  # the stage (kept in the run folder, not the user's cache) and the online loop
            "method.weight_path=true"]  # the preference as text: Meal's net learns by the sample weight


def test_meal_train_cli_runs_and_ends_with_a_front(tiny_llama, tmp_path):
    out = tmp_path / "run"
    proc = _run(["meal.cli.train", "method=meal", *tiny_overrides(tiny_llama, out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hypervolume" in proc.stdout and "front.png" in proc.stdout
    front = json.load(open(out / "front.json"))
    assert len(front["points"]) == 11 and len(front["pareto"]) == 11
    assert (out / "front.png").stat().st_size > 1000
    assert (out / "checkpoints" / "latest").read_text() == "step_000002"


def test_meal_train_cli_rejects_bad_value_with_the_field_name(tmp_path):
    proc = _run(["meal.cli.train", "trainer.n_samples=0", "logger=none", f"trainer.out_dir={tmp_path / 'r'}"],
                cwd=tmp_path)
    assert proc.returncode == 2
    assert "trainer.n_samples: N must be >= 1" in proc.stderr + proc.stdout


def _launch(cmd, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(cwd / "torch_extensions")}  # what a launch compiles (nothing: below)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rows(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def _accelerate_config(tmp_path, name):
    """A shipped accelerate config with 2 processes (and the DeepSpeed file found from any folder)."""
    shipped = open(os.path.join(ROOT, "experiments", "accelerate", name)).read()
    assert "num_processes: 8" in shipped
    out = tmp_path / name
    out.write_text(shipped.replace("num_processes: 8", "num_processes: 2")
                   .replace("deepspeed_config_file: experiments/", f"deepspeed_config_file: {ROOT}/experiments/"))
    return str(out)


@pytest.mark.processes
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_data_parallel_and_deepspeed_zero2_on_two_cpu_processes(tiny_llama, tmp_path, lora):
    """`accelerate launch` with the shipped configs on two CPU processes (gloo), against one process (in-process
    here), whose training both launches must reproduce: each process holds its share of the batch's inner and
    meta halves, the virtual step takes the global inner gradient and the meta-gradient the global meta loss's
    direction. Full fine-tuning: plain data parallelism (multi_gpu.yaml: sharded batch, averaged gradients,
    rank 0 writes, ranks' parameters checked identical at every checkpoint), then DeepSpeed ZeRO-2
    (deepspeed_zero2.yaml, 2 micro-batches per rank), which must reproduce the plain run's losses and gradient
    norms. With LoRA (whose random init draws from each rank's own seed: rank 0's start must reach every rank)
    and the stage (it runs under the launch, and no gradient of it may leak into step 1): ZeRO-2 stopped after
    2 iterations, its optimizer's two shards saved, and resumed for a third."""
    # a plain SGD virtual step: DeepSpeed keeps AdamW's moments partitioned, so the Adam preconditioner of the
    # virtual step differs between the two launches (as the run logs)
    common = ["method=meal", "trainer.final_eval=false", "trainer.batch_size=8", "trainer.micro_batch_size=2",
              "method.precondition=none"]
    if not lora:  # the online loop alone, from the base weights (where the meta-gradient is not ~1e-6)
        common += ["conditioning.enabled=false"]
    if lora:  # the stage too, and Meal's default label path through preference-aware LoRA
        common += ["policy.lora.enabled=true", "policy.lora.preference_aware=true", "policy.lora.r=4",
                   "policy.lora.target_modules=[q_proj,v_proj]", "trainer.lr=1e-2", "method.weight_path=false"]

    def launch(config, out, port):
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                _accelerate_config(tmp_path, config), "--main_process_port", port, "-m", "meal.cli.train",
                *tiny_overrides(tiny_llama, out), *common]  # later overrides win

    ports = ("29531", "29532") if lora else ("29533", "29534")  # distinct: a port just closed may still be held
    dp, ds = tmp_path / "dp", tmp_path / "ds"
    if not lora:
        _launch([*launch("multi_gpu.yaml", dp, ports[0]), "trainer.iterations=3"], tmp_path)
    pytest.importorskip("deepspeed")  # in the dev extra
    ds_launch = launch("deepspeed_zero2.yaml", ds, ports[1])
    if lora:
        _launch([*ds_launch, "trainer.iterations=2"], tmp_path)
        state = torch.load(ds / "checkpoints" / "step_000002" / "state.pt", weights_only=False)
        shards = state["optimizer"]["deepspeed_zero"]
        assert len(shards) == 2 and all(sh["partition_count"] == [2] and int(sh["zero_stage"]) == 2 for sh in shards)
        proc = _launch([*ds_launch, "trainer.iterations=3", "trainer.resume=true"], tmp_path)
        assert "resumed" in proc.stdout + proc.stderr
    else:
        _launch([*ds_launch, "trainer.iterations=3"], tmp_path)
    # DeepSpeed's CPU shared-memory all-reduce (DeepSpeed-Inference's alone) is not compiled: 40-80 s on 2 cores
    assert not (tmp_path / "torch_extensions").exists()
    launched = ds if lora else dp  # the launch held against one process
    rows = _rows(launched)
    assert [r["step"] for r in rows] == [1, 2, 3]  # one writer
    assert all(r["train/processes"] == 2 for r in rows) and "meta/grad_norm" in rows[0]
    assert (launched / "checkpoints" / "latest").read_text() == "step_000003"
    if not lora:  # ZeRO-2 against the plain launch
        ds_rows = _rows(ds)
        assert [r["step"] for r in ds_rows] == [1, 2, 3]
        for a, b in zip(rows, ds_rows):
            assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
            assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-3)
            assert b["meta/grad_norm"] == pytest.approx(a["meta/grad_norm"], rel=1e-3)
    from tests.test_config import _compose

    from meal.methods import train

    one = tmp_path / "one_process"
    train(_compose([*tiny_overrides(tiny_llama, one), *common, "trainer.iterations=3"]))
    one_rows = _rows(one)
    for a, b in zip(one_rows, rows, strict=True):  # the launch, against the single process's
        for key in ("train/loss", "meta/loss", "reward/concise", "meta/label_shift"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), (b["step"], key)
        for key in ("train/grad_norm", "meta/grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-3), (b["step"], key)
    assert one_rows[-1]["meta/param_distance"] > 0  # the net moved
    from safetensors.torch import load_file

    for name in ("policy", "net"):
        single, two = (load_file(str(d / "checkpoints" / "step_000003" / f"{name}.safetensors"))
                       for d in (one, launched))
        for n in single:
            torch.testing.assert_close(two[n], single[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name} {n}: {m}")
