"""Rewarded Soups (Rame et al. 2023): one policy per objective, their weights interpolated over the grid.

    0  the common start (the conditioning stage, in start_run)
    1  for each objective k: GRPO on R_k alone from the start, conditioned on w = e_k
       (:func:`meal.methods.grpo.train_policies` at the K one-hot preferences: ``policies/<k>.safetensors``)
    front: at preference w the soup sum_k w_k theta_k answers, with w in its prompt (Soup), by
    ``method.rule``:
       params  every trainable tensor interpolated, LoRA A and B separately (the default)
       merged  each adapted layer's full weight update interpolated, sum_k w_k Delta W_k, carried by the
               base weights while the adapters are off
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from safetensors.torch import load_file

from meal.config import knob, need
from meal.harness.run import start_run
from meal.methods import Method
from meal.methods.grpo import check_grpo, load_into, policy_file, train_policies
from meal.policy.preference_lora import PreferenceLoRALinear, base_only
from meal.policy.rollout import ConditionedPolicy, Conditioner, ResponderBase
from meal.policy.sampling import Generation, GenerationSettings


@dataclass
class SoupsConfig:
    """Rewarded Soups (the recipe meal/methods/soups.py): one GRPO policy per objective from the common start,
    interpolated over the grid; ``trainer.iterations`` GRPO steps per policy."""

    recipe: str = knob("soups", "The recipe meal/methods/soups.py.")
    name: str = knob("soups", "Label of the method in run names and comparisons.")
    rule: str = knob("params", "params (every trainable tensor interpolated, LoRA A and B separately) | merged (each "
                     "adapted layer's full weight update interpolated).")
    beta: float = knob(0.0, "KL coefficient of GRPO against the starting policy (TRL's default 0).")


def check_config(r, cfg) -> None:
    need(r.rule in ("params", "merged"), "method.rule", f"params | merged, got {r.rule!r}")
    need(cfg.policy.lora.enabled, "policy.lora.enabled", "a soup interpolates adapters: needs LoRA")
    check_grpo(r, cfg)


def one_hot(k: int) -> list[list[float]]:
    return [[1.0 if j == i else 0.0 for j in range(k)] for i in range(k)]


def interpolate(experts: Sequence[dict[str, torch.Tensor]], w: Sequence[float]) -> dict[str, torch.Tensor]:
    """The ``params`` soup: sum_k w_k theta_k for every tensor (LoRA A and B interpolated separately)."""
    return {n: sum(float(wk) * e[n].float() for wk, e in zip(w, experts)) for n in experts[0]}


def layer_deltas(model, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """The full weight update (out, in) of every adapted linear layer of ``model`` as its weights stand:
    preference-aware LoRA at preference ``w`` (K,): scale * (B_0 A_0 + sum_k w_k B_k A_k); peft LoRA:
    its merged delta."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, PreferenceLoRALinear):
            coef = torch.cat([torch.ones(1), w.float()]).to(mod.pref_lora_A.dtype)  # (K+1,)
            out[name] = mod.scale * torch.einsum("k,kor,kri->oi", coef, mod.pref_lora_B, mod.pref_lora_A).detach()
        elif hasattr(mod, "get_delta_weight") and hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            out[name] = mod.get_delta_weight("default").detach()
    return out


@dataclass
class Soup(ResponderBase):
    """Rewarded Soups' responder: the experts' weights mixed by the preference w of each call."""

    policy: ConditionedPolicy
    params: dict[str, torch.Tensor]
    experts: list[dict[str, torch.Tensor]]
    rule: str = "params"

    @property
    def objectives(self) -> list[str]:
        return self.policy.objectives

    def preference_text(self, w: Sequence[float]) -> str:
        return self.policy.preference_text(w)

    def load_weights(self, w: Sequence[float]) -> None:
        """The soup at ``w`` into the model's trainable tensors (meal-export; the params rule only: the merged
        rule mixes full weight updates within a call)."""
        if self.rule != "params":
            raise ValueError("method.rule=merged: the soup is a full-weight mix made per call; export the run's "
                             "experts with rule=params")
        load_into(self.params, "", interpolate(self.experts, list(w)))

    def respond(self, texts, prefs: torch.Tensor, settings: GenerationSettings, seed: int | None = None,
                n: int = 1) -> Generation:
        if not all(torch.allclose(p, prefs[0]) for p in prefs):
            raise ValueError("a soup answers one preference per call (its weights are mixed by it)")
        w = prefs[0]
        if self.rule == "params":
            load_into(self.params, "", interpolate(self.experts, w.tolist()))
            return self.policy.respond(texts, prefs, settings, seed, n)
        with self.merged(w):
            return self.policy.respond(texts, prefs, settings, seed, n)

    @contextlib.contextmanager
    def merged(self, w: torch.Tensor):
        """Within the block the base weights carry sum_k w_k Delta W_k and the adapters are off."""
        model = self.policy.model
        deltas = []
        for expert in self.experts:
            load_into(self.params, "", expert)
            deltas.append(layer_deltas(model, w))
        soup = {name: sum(float(wk) * d[name] for wk, d in zip(w.tolist(), deltas)) for name in deltas[0]}
        bases = {name: model.get_submodule(name).base_layer if hasattr(model.get_submodule(name), "base_layer")
                 else model.get_submodule(name).base for name in soup}
        off = base_only(model)
        saved = {name: base.weight.detach().clone() for name, base in bases.items()}  # restored bit for bit
        with torch.no_grad():
            for name, delta in soup.items():
                bases[name].weight += delta.to(bases[name].weight.dtype)
        try:
            with off:
                yield
        finally:
            with torch.no_grad():
                for name, weight in saved.items():
                    bases[name].weight.copy_(weight)


def responder(cfg, model, tokenizer, run_dir: str | None = None) -> Soup:
    """What evaluates a Rewarded Soups run (``run_dir``: the run folder holding ``policies/``)."""
    from meal.policy.model import trainable_parameters

    folder = run_dir or cfg.trainer.out_dir
    experts = [load_file(policy_file(folder, k)) for k in range(len(cfg.task.objectives))
               if os.path.exists(policy_file(folder, k))]
    policy = ConditionedPolicy(model, Conditioner(cfg.task.template, list(cfg.task.objectives), tokenizer))
    return Soup(policy, trainable_parameters(model), experts, cfg.method.rule)


def train(cfg) -> dict[str, Any]:
    """One GRPO expert per objective from the common start; the soup's front over the whole grid."""
    t = cfg.trainer
    with start_run(cfg, optimizer=False) as run:  # GRPO brings its own
        train_policies(cfg, run, one_hot(len(run.objectives)))  # 1. the experts, w = e_k
        summary = {"run_dir": run.run_dir, "iterations": t.iterations, "experts": len(run.objectives)}
        if t.final_eval:
            summary.update(run.evaluate(responder(cfg, run.policy.model, run.policy.tokenizer, run.run_dir)))
        return summary


METHOD = Method("soups", SoupsConfig, train, responder, check_config)
