"""The real entry points in a subprocess with a tiny budget (as a user runs them)."""

import json
import os
import subprocess
import sys

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
            "trainer.stats_cache=null"]


def test_meal_train_cli_runs_and_ends_with_a_front(tiny_llama, tmp_path):
    out = tmp_path / "run"
    proc = _run(["meal.train", "method=meal", *tiny_overrides(tiny_llama, out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hypervolume" in proc.stdout and "front.png" in proc.stdout
    front = json.load(open(out / "front.json"))
    assert len(front["points"]) == 11 and len(front["pareto"]) == 11
    assert (out / "front.png").stat().st_size > 1000
    assert (out / "checkpoints" / "latest").read_text() == "step_000002"


def test_meal_train_cli_rejects_bad_value_with_the_field_name(tmp_path):
    proc = _run(["meal.train", "trainer.n_samples=0", "logger=none", f"trainer.out_dir={tmp_path / 'r'}"],
                cwd=tmp_path)
    assert proc.returncode == 2
    assert "trainer.n_samples: N must be >= 1" in proc.stderr + proc.stdout


def test_data_parallel_two_cpu_processes(tiny_llama, tmp_path):
    """Two CPU processes (gloo) under torchrun, which is what `accelerate launch --multi_gpu` runs on GPUs
    (accelerate's own CPU launcher starts a single process): sharded batch, averaged gradients, rank 0 writes,
    and the ranks' parameters are checked identical at every checkpoint."""
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "meal.train", "method=meal", *tiny_overrides(tiny_llama, out), "trainer.final_eval=false",
           "trainer.batch_size=8"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]  # one writer
    assert all(r["train/processes"] == 2 for r in rows) and "meta/grad_norm" in rows[0]
    assert (out / "checkpoints" / "latest").read_text() == "step_000002"
