"""The package's shape: its import graph (every ``import`` of ``meal/``, those inside functions too) has no
circle, no library module imports a command's module, and a method registers from a test file alone."""

import ast
import json
import os
import pathlib

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[1]
# the commands' modules (console scripts of setup.cfg, and what they share): nothing below them imports them
COMMANDS = {"meal.cli", "meal.cli.train", "meal.cli.evaluate", "meal.cli.generate", "meal.cli.export",
            "meal.cli.compare"}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the meal modules it imports (a ``from meal.x import y`` where y is a module counts as meal.x.y)."""
    files = {_module_name(p): p for p in (ROOT / "meal").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                           for a in node.names]
            deps |= {t for t in targets if t in files and t != name}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle found by a depth-first search (one path per back edge)."""
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert len(graph) > 20 and "meal.methods.grpo" in graph["meal.methods.soups"]  # submodules are seen
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_library_module_imports_a_command():
    graph = import_graph()
    assert COMMANDS <= set(graph)
    wrong = {lib: sorted(deps & COMMANDS) for lib, deps in graph.items() if lib not in COMMANDS and deps & COMMANDS}
    assert wrong == {}


def test_no_shared_code_asks_for_a_method_by_name():
    """Shared code reads a method's registered capabilities, never its name (``recipe == "ric"``) or an
    attribute a responder may lack (``hasattr(responder, ...)``)."""
    shared = [p for p in (ROOT / "meal").rglob("*.py") if "methods" not in p.parts]
    for path in shared:
        text = path.read_text()
        for pattern in ('recipe == "', "recipe in (", 'hasattr(responder', 'hasattr(module', '"stack_on" in'):
            assert pattern not in text, (path.name, pattern)


# ------------------------------------------------------------------------------- a method from a test file
@pytest.fixture
def toy_method():
    """A method defined here alone: its config, its checks, its recipe over the harness and its responder."""
    from dataclasses import dataclass

    from meal import methods
    from meal.config import knob, need
    from meal.harness.run import start_run
    from meal.policy.rollout import ConditionedPolicy, Conditioner

    @dataclass
    class ToyConfig:
        recipe: str = knob("toy", "The toy recipe.")
        name: str = knob("toy", "Label.")
        scale: float = knob(0.5, "How far every trainable tensor moves once.")

    def check(m, cfg):
        need(m.scale > 0, "method.scale", f"must be > 0, got {m.scale}")

    def responder(cfg, model, tokenizer, run_dir=None):
        return ConditionedPolicy(model, Conditioner(cfg.task.template, list(cfg.task.objectives), tokenizer))

    def train(cfg):
        with start_run(cfg) as run:  # the harness opens and closes everything
            with torch.no_grad():
                for p in run.policy.params.values():
                    p.add_(cfg.method.scale)
            run.save(1, run.policy.optimizer)
            return {"run_dir": run.run_dir, **run.evaluate(responder(cfg, run.policy.model, run.policy.tokenizer))}

    method = methods.register(methods.Method("toy", ToyConfig, train, responder, check))
    yield method
    methods.unregister("toy")


def test_a_method_registers_from_a_test_file_alone(toy_method, tiny_llama, tmp_path):
    from tests.conftest import tiny_config

    from meal.config import ConfigError
    from meal.methods import names, train

    assert "toy" in names()
    cfg = {**tiny_config(tiny_llama, str(tmp_path / "run"), **{"trainer.iterations": 1,
                                                               "trainer.final_eval_prompts": 2}),
           "method": {"recipe": "toy", "name": "toy", "scale": 0.25}}
    with pytest.raises(ConfigError, match="method.scale: must be > 0"):
        train({**cfg, "method": {"recipe": "toy", "scale": -1.0}})
    with pytest.raises(ConfigError, match="method.scael: unknown setting; did you mean method.scale"):
        train({**cfg, "method": {"recipe": "toy", "scael": 1.0}})
    summary = train(cfg)
    front = json.load(open(os.path.join(summary["run_dir"], "front.json")))
    assert len(front["points"]) == 11 and front["label"] == "toy"
    saved = load_file(os.path.join(summary["run_dir"], "checkpoints", "step_000001", "policy.safetensors"))
    start = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    moved = [(saved[n] - start[n]).abs().max().item() for n in saved if n in start]
    assert moved and all(m == pytest.approx(0.25) for m in moved)  # the toy's train ran, on the weights saved
    from meal.harness.saved_run import EvalOptions, evaluate_run

    again = evaluate_run(summary["run_dir"], EvalOptions(prompts=1, out_dir=str(tmp_path / "eval")))  # meal-eval too
    assert os.path.exists(again["front_json"])


def test_a_builtin_name_cannot_be_taken():
    from meal import methods

    with pytest.raises(ValueError, match="one of meal's own"):
        methods.register(methods.get("ric"))


# ------------------------------------------------------------------------------- the config read at the edge
def _config_stops(cfg: dict) -> set[tuple[str, str]]:
    """Train ``cfg`` and return every (module, function) of meal/ that was called with the run's config (the
    whole of it: a DictConfig holding ``trainer`` and ``task``, or a TrainConfig) among its arguments."""
    import sys

    from omegaconf import DictConfig

    import meal
    from meal.methods import train

    root = os.path.dirname(os.path.abspath(meal.__file__)) + os.sep
    seen = set()

    def holds_config(value) -> bool:
        return (isinstance(value, DictConfig) and "trainer" in value and "task" in value) \
            or type(value).__name__ == "TrainConfig"

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(root):
            code = frame.f_code
            names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
            if any(holds_config(frame.f_locals.get(n)) for n in names):
                seen.add((frame.f_globals.get("__name__"), code.co_name))

    sys.setprofile(profile)
    try:
        train(cfg)
    finally:
        sys.setprofile(None)
    return seen


def test_the_run_config_stays_in_the_recipe_and_the_edge(tiny_llama, tmp_path):
    """Followed through a run, the config reaches the recipe, the config check and the harness's edge
    (``start_run`` and :mod:`meal.harness.settings`); nothing below takes it (the conditioning stage, the
    normalisation pass, the logger, the report and ``Run`` take the parts read for them)."""
    from tests.conftest import tiny_config

    stage = {"conditioning.enabled": True, "conditioning.steps": 1, "conditioning.batch_size": 2,
             "conditioning.micro_batch_size": 2, "conditioning.pool_prompts": 2, "conditioning.cache": None,
             "task.pool_instructions": [""], "trainer.iterations": 1, "trainer.batch_size": 2,
             "policy.lora": {"enabled": True, "preference_aware": True, "r": 2, "alpha": 4}}
    with_stage = _config_stops(tiny_config(tiny_llama, str(tmp_path / "a"), **stage))
    without = _config_stops(tiny_config(tiny_llama, str(tmp_path / "b"), **{"trainer.iterations": 1}))
    for seen in (with_stage, without):
        assert ("meal.methods.meal", "train") in seen and ("meal.harness.run", "start_run") in seen  # it looked
        below = {s for s in seen if s[0] not in ("meal.methods.meal", "meal.harness.settings", "meal.config",
                                                 "meal.methods") and s != ("meal.harness.run", "start_run")}
        assert not below, f"the run's config was handed below the edge to {sorted(below)}"
