"""MORLHF: linear scalarisation w . R with TRL's GRPO trainer, one policy per preference, read top to bottom.

    0  the common start (the conditioning stage, in start_run); its weights are kept
    for each preference w of the grid (``method.grid_points``), :func:`meal.methods.grpo.train_policies`:
    1  the policy restarts from the common start, conditioned on w (prompt and, with preference-aware
       LoRA, the adapters' mix)
    2  GRPO (TRL): ``trainer.iterations`` steps of ``trainer.batch_size`` prompts x ``trainer.n_samples``
       completions; the objectives are its reward functions (normalised rewards), ``reward_weights`` = w
    3  the policy's trainable weights are saved (``policies/<i>.safetensors``) and checkpointed
    front: each policy evaluated at its own preference (MorlhfPolicies)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from meal.config import knob, need
from meal.evaluation.front import preference_grid
from meal.harness.run import start_run
from meal.methods import Method
from meal.methods.grpo import check_grpo, load_into, policy_file, train_policies
from meal.policy.rollout import ConditionedPolicy, Conditioner, ResponderBase
from meal.policy.sampling import Generation, GenerationSettings


@dataclass
class MorlhfConfig:
    """MORLHF (the recipe meal/methods/morlhf.py): linear scalarisation w . R with TRL's GRPO trainer, one
    policy per preference of a grid, each from the common start; ``trainer.iterations`` GRPO steps per
    policy, each on ``trainer.batch_size`` prompts x ``trainer.n_samples`` completions."""

    recipe: str = knob("morlhf", "The recipe meal/methods/morlhf.py.")
    name: str = knob("morlhf", "Label of the method in run names and comparisons.")
    grid_points: int = knob(3, "Preferences trained, one policy each (K = 2: evenly spaced in w1, 11 = the full "
                            "evaluation grid; K = 3 always trains the 13-point grid).")
    beta: float = knob(0.0, "KL coefficient of GRPO against the starting policy (TRL's default 0: no reference model).")


def check_config(r, cfg) -> None:
    k = len(cfg.task.objectives)
    need(r.grid_points >= 2, "method.grid_points", f"needs at least the two extremes, got {r.grid_points}")
    need(k in (2, 3), "task.objectives", f"MORLHF trains one policy per grid preference, defined for K = 2 or 3, "
         f"got {k}")
    check_grpo(r, cfg)


@dataclass
class MorlhfPolicies(ResponderBase):
    """MORLHF's responder: the policy trained at preference w answers under w (a grid point it was not
    trained at is refused: its front is each policy at its own preference)."""

    policy: ConditionedPolicy
    params: dict[str, torch.Tensor]
    trained: list[list[float]]  # the preferences it trained a policy at
    folder: str

    @property
    def grid(self) -> list[list[float]]:
        """The only preferences it answers: those it trained a policy at."""
        return self.trained

    @property
    def objectives(self) -> list[str]:
        return self.policy.objectives

    def preference_text(self, w: Sequence[float]) -> str:
        return self.policy.preference_text(w)

    def load_weights(self, w: Sequence[float]) -> None:
        """The policy trained at ``w`` (one of the grid) into the model's trainable tensors."""
        w = torch.tensor(list(w))
        match = [i for i, g in enumerate(self.grid) if torch.allclose(torch.tensor(g), w, atol=1e-4)]
        if not match:
            raise ValueError(f"MORLHF trained no policy at {w.tolist()}; its preferences are {self.grid}")
        load_into(self.params, policy_file(self.folder, match[0]))

    def respond(self, texts, prefs: torch.Tensor, settings: GenerationSettings, seed: int | None = None,
                n: int = 1) -> Generation:
        if not all(torch.allclose(p, prefs[0]) for p in prefs):
            raise ValueError("MORLHF answers one preference per call (one policy per preference)")
        self.load_weights(prefs[0].tolist())
        return self.policy.respond(texts, prefs, settings, seed, n)


def responder(cfg, model, tokenizer, run_dir: str | None = None) -> MorlhfPolicies:
    """What evaluates a MORLHF run (``run_dir``: the run folder holding ``policies/``)."""
    from meal.policy.model import trainable_parameters

    k = len(cfg.task.objectives)
    policy = ConditionedPolicy(model, Conditioner(cfg.task.template, list(cfg.task.objectives), tokenizer))
    return MorlhfPolicies(policy, trainable_parameters(model), preference_grid(k, cfg.method.grid_points),
                          run_dir or cfg.trainer.out_dir)


def train(cfg) -> dict[str, Any]:
    """One GRPO policy per grid preference from the common start; the front of each at its own preference."""
    t = cfg.trainer
    with start_run(cfg, optimizer=False) as run:  # GRPO brings its own
        grid = preference_grid(len(run.objectives), cfg.method.grid_points)
        train_policies(cfg, run, grid)  # 1-3 for each preference of the grid
        summary = {"run_dir": run.run_dir, "iterations": t.iterations, "policies": len(grid)}
        if t.final_eval:
            # at its own grid
            summary.update(run.evaluate(responder(cfg, run.policy.model, run.policy.tokenizer, run.run_dir)))
        return summary


METHOD = Method("morlhf", MorlhfConfig, train, responder, check_config)
