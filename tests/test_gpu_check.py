"""experiments/gpu/check.sh, the prepared GPU check: its --dry-run runs every part on the CPU with tiny
shapes (so that the script a lent GPU machine runs cannot rot), and a failing part is recorded while the
next one still runs."""

import importlib.util
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_dry_run_measures_every_part(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "experiments", "gpu", "check.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.load(open(tmp_path / "check.json"))
    assert (tmp_path / "check.log").stat().st_size > 0
    parts = result["parts"]
    assert result["dry_run"] and set(parts) == {"a_demo", "b_7b_shape", "c_sampling"}
    assert all(p["ok"] for p in parts.values()), {k: p.get("error") for k, p in parts.items()}
    demo = parts["a_demo"]  # the recipe ran: stage, iterations with the net, the front
    assert demo["iterations"] == 2 and demo["stage_budget"]["steps"] == 2
    assert all(demo["iteration_phases_s"][p] > 0 for p in ("generate", "inner_step", "meta_step", "real_step"))
    assert math.isfinite(demo["front"]["hypervolume"]) and demo["meta_learner"]["meta/param_distance"] > 0
    shape = parts["b_7b_shape"]
    assert shape["generate"]["new_tokens"] == 8 * 6  # a fixed token count: 4 prompts x 2 samples x 6
    for setting in ("no_checkpointing", "checkpointing"):
        res = shape[setting]
        assert res["real_step"]["seconds"] > 0
        for engine in ("autograd", "directional-per_example", "directional-jvp", "directional-fd"):
            assert res[engine]["seconds"] > 0 and res[engine]["hypergradient"] > 0, (setting, engine, res[engine])
    sampling = parts["c_sampling"]
    assert sampling["meal_generate"]["tokens"] > 0 and sampling["plain_generate"]["tokens"] > 0
    assert sampling["meal_over_plain"] > 0


def test_a_failing_part_is_recorded_and_the_next_one_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "experiments", "gpu", "check.py"))
    check = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = check  # its dataclasses look their module up
    spec.loader.exec_module(check)
    results, path = {"parts": {}}, str(tmp_path / "check.json")

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access")

    check.run_part(results, "first", broken, path)
    check.run_part(results, "second", lambda: {"value": 1}, path)
    saved = json.load(open(path))["parts"]
    assert saved["first"]["ok"] is False and "illegal memory access" in saved["first"]["error"]
    assert "Traceback" in saved["first"]["traceback"]
    assert saved["second"] == {"ok": True, "value": 1, "seconds": saved["second"]["seconds"]}
