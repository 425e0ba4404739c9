"""MetaAligner (Yang et al. 2024): a policy-agnostic corrector, over the shared harness, read top to bottom.

The policy is never touched: a second causal LM (the corrector, LoRA) learns to rewrite a response so
that it is better on the objectives named in its prompt, each objective given as text (the paper's
text markers: ``task.descriptions``), so objectives never seen in training can be asked for::

    0  the scored corpus of the conditioning stage (start_run): responses in prompt groups with their
       normalised rewards (the conditioned policy is one of the policies the corrector can be stacked on)
    1  Algorithm 1, on every pair of responses to one prompt, objective by objective: better / worse /
       equal within ``method.tolerance`` normalised units
       (:func:`meal.methods.metaaligner_data.build_dataset`, with the corrector's prompt format)
         preference subset D_p  T(q, weak, O_win, better) -> strong   (one row per direction that wins)
         equal subset      D_e  T(q, y2, O_eq, equal) -> y1
    2  the corrector: ``method.corrector`` (default the policy's base model), plain LoRA
    3  three SFT stages on T(q, y0, O, t) -> y, loss on y only (AdamW, ``method.lr``):
         3a warm-up      ``method.warmup_steps`` on rows of D_e with the target set to the input (identity)
         3b equal        ``method.equal_steps`` on D_e
         3c preference   ``method.preference_steps`` on D_p
    inference: any responder's response y0 is rewritten for the objectives O(w) (:class:`Corrected`)

Beyond the paper, a preference w is written into the objective descriptions: the objectives with
w_k > 0, each marker prefixed by its weight ("helpful (weight 0.70): ..."). Training rows carry the
same: a preference row weighs its winning objectives by how much the strong response wins on each
(the reward gaps, normalised to sum 1), an equal row weighs its objectives equally. With
``method.weights_in_markers=false`` the prompt is the paper's exactly and the grid's front is the
objective subsets {k: w_k > 0}.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, List, Sequence

import numpy as np
import torch

from meal.config import ConfigError, PolicyConfig, knob, need
from meal.harness.run import start_run
from meal.methods import Method
from meal.methods.metaaligner_data import (STAGES, CorrectionRow, build_dataset, corrector_text, format_markers,
                                           load_rows, save_rows, warmup_rows, wrap)
from meal.policy.losses import build_batch, policy_step
from meal.policy.preference_lora import base_only
from meal.policy.rollout import ConditionedPolicy, Conditioner, ResponderBase
from meal.policy.sampling import Generation, GenerationSettings, generate

log = logging.getLogger(__name__)


@dataclass
class MetaAlignerConfig:
    """MetaAligner (Yang et al. 2024; the recipe meal/methods/metaaligner.py): a corrector LM trained on pairs
    of the conditioning corpus (Algorithm 1) in three SFT stages, stacked on any policy at inference."""

    recipe: str = knob("metaaligner", "The recipe meal/methods/metaaligner.py.")
    name: str = knob("metaaligner", "Label of the method in run names and comparisons.")
    corrector: PolicyConfig = field(default_factory=PolicyConfig, metadata={
        "help": "The corrector model (conf/method/metaaligner.yaml: the policy's base model, plain LoRA)."})
    tolerance: float = knob(0.25, "Two responses are equal on an objective when their normalised rewards differ by "
                            "at most this (Algorithm 1's '=').")
    warmup_steps: int = knob(10, "Stage 1: steps on equal-subset rows with the target set to the input (identity).")
    equal_steps: int = knob(20, "Stage 2: steps on the equal-preference subset.")
    preference_steps: int = knob(60, "Stage 3: steps on the preference subset (weak-to-strong correction).")
    batch_size: int = knob(8, "Rows per corrector step.")
    micro_batch_size: int = knob(8, "Rows per forward/backward; divides batch_size.")
    lr: float = knob(5e-4, "AdamW learning rate of the corrector (constant).")
    weights_in_markers: bool = knob(True, "Write each objective's weight into its marker ('helpful (weight 0.70): "
                                    "...'); False: the paper's template, and the grid's front is the objective "
                                    "subsets {k: w_k > 0}.")
    stack_on: str = knob("conditioned", "What the run's own evaluation rewrites: base (the policy without preference, "
                         "adapters off) | conditioned (the conditioned policy at w) | a run folder (its responder).")
    zero_shot: List[str] = knob([], "Rewards never trained, asked for by their description after training "
                                "(zero_shot/zero_shot.md); each must be a key of `rewards` with a task description.")


def check_config(r, cfg) -> None:
    from meal.rewards import reward_names_known

    known = reward_names_known(cfg.rewards)
    for name in r.zero_shot:
        need(name in known, "method.zero_shot", f"unknown reward {name!r}; defined rewards: {sorted(known)}")
    descriptions = cfg.task.descriptions
    for name in list(cfg.task.objectives) + list(r.zero_shot):
        need(name in descriptions, "task.descriptions", f"objective {name!r} has no description (MetaAligner asks "
             f"for objectives in text; add task.descriptions.{name})")
    need(r.tolerance >= 0, "method.tolerance", f"must be >= 0, got {r.tolerance}")
    for f in ("warmup_steps", "equal_steps", "preference_steps"):
        need(getattr(r, f) >= 0, f"method.{f}", f"must be >= 0, got {getattr(r, f)}")
    need(r.warmup_steps + r.equal_steps + r.preference_steps > 0, "method.preference_steps",
         "the three stages have no step at all")
    need(r.batch_size >= 1 and r.batch_size % r.micro_batch_size == 0, "method.micro_batch_size",
         f"must divide method.batch_size ({r.batch_size}), got {r.micro_batch_size}")
    need(r.lr > 0, "method.lr", f"must be > 0, got {r.lr}")
    need(not r.corrector.lora.preference_aware, "method.corrector.lora.preference_aware",
         "the corrector reads its objectives as text: plain LoRA (false)")
    need(cfg.conditioning.enabled, "conditioning.enabled", "MetaAligner builds its pairs from the conditioning "
         "stage's scored corpus")
    need(r.stack_on in ("base", "conditioned") or os.path.isdir(r.stack_on), "method.stack_on",
         f"base | conditioned | a run folder, got {r.stack_on!r}")


# ---------------------------------------------------------------------------------------- the corrector
class AdapterBag(torch.nn.Module):
    """The corrector's trainable tensors as one module (shared, not copied), so that a checkpoint saves
    and restores them beside the policy's."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        super().__init__()
        self.names = list(params)
        self.tensors = torch.nn.ParameterList(params.values())


def load_corrector(cfg, device: str | None = None):
    """(model, tokenizer, trainable params) of the corrector (plain LoRA or full fine-tuning)."""
    from meal.policy.model import load_policy, trainable_parameters

    model, tok = load_policy(cfg.method.corrector, None, device=device)
    return model, tok, trainable_parameters(model)


@dataclass
class CorrectorSettings:
    """How the corrector writes: the descriptions of the objectives, which to ask for, the chat wrapping."""

    descriptions: dict[str, str]
    objectives: list[str]
    weights_in_markers: bool = True
    chat: bool = True
    suffix: str = ""
    min_weight: float = 0.005

    def markers(self, w: Sequence[float]) -> str:
        """O(w): the objectives with w_k > 0 in task order, with their weights when ``weights_in_markers``."""
        keep = [k for k, x in enumerate(w) if x >= self.min_weight]
        weights = [w[k] / sum(w[k] for k in keep) for k in keep] if self.weights_in_markers else None
        return format_markers([self.objectives[k] for k in keep], self.descriptions, weights)

    def row_markers(self, row: CorrectionRow) -> str:
        return format_markers([self.objectives[k] for k in row.objectives], self.descriptions,
                              row.weights if self.weights_in_markers else None)


class PlainPolicy(ResponderBase):
    """A policy asked without any preference (the task text alone in the chat template); ``base``: with
    its adapters off. What the corrector is stacked on as "the base policy"."""

    def __init__(self, model, tokenizer, objectives: Sequence[str], chat: bool = True, suffix: str = "",
                 base: bool = False):
        self.model, self.tokenizer, self._objectives = model, tokenizer, list(objectives)
        self.chat, self.suffix, self.base = chat, suffix, base

    @property
    def objectives(self) -> list[str]:
        return self._objectives

    def respond(self, texts, prefs: torch.Tensor, settings: GenerationSettings, seed: int | None = None,
                n: int = 1) -> Generation:
        prompts = [wrap(t, self.tokenizer, self.chat, self.suffix) for t in texts for _ in range(n)]
        with base_only(self.model) if self.base else contextlib.nullcontext():  # base: the adapters off
            # a preference-aware policy's layers take the preference even while they are off
            return (settings.sampler or generate)(self.model, self.tokenizer, prompts, settings, seed,
                                                  prefs=prefs.repeat_interleave(n, 0))


class Corrected(ResponderBase):
    """MetaAligner's responder (the paper's Eqn. 4): ``upstream`` answers (any responder: the base policy,
    a conditioned policy, a Meal run), the corrector rewrites each answer for O(w). Keeps what the
    rewriting cost (:meth:`cost`)."""

    def __init__(self, upstream, corrector, tokenizer, settings: CorrectorSettings):
        self.upstream, self.corrector, self.tokenizer, self.settings = upstream, corrector, tokenizer, settings
        self.counts = {"responses": 0, "upstream_tokens": 0, "corrector_tokens": 0, "upstream_seconds": 0.0,
                       "corrector_seconds": 0.0}

    @property
    def objectives(self) -> list[str]:
        return self.settings.objectives

    def rewrite(self, texts: Sequence[str], answers: Sequence[str], markers: Sequence[str],
                settings: GenerationSettings, seed: int | None = None) -> Generation:
        """The corrector's edit of each (question, answer) for the objectives written in ``markers``."""
        s = self.settings
        prompts = [wrap(corrector_text(q, a, m), self.tokenizer, s.chat, s.suffix)
                   for q, a, m in zip(texts, answers, markers)]
        return generate(self.corrector, self.tokenizer, prompts, settings, None if seed is None else seed + 1)

    def respond(self, texts, prefs: torch.Tensor, settings: GenerationSettings, seed: int | None = None,
                n: int = 1) -> Generation:
        t0 = time.perf_counter()
        first = self.upstream.respond(texts, prefs, settings, seed, n)  # (B*N)
        t1 = time.perf_counter()
        rep = prefs.repeat_interleave(n, 0)
        out = self.rewrite([t for t in texts for _ in range(n)], first.texts,
                           [self.settings.markers(w.tolist()) for w in rep], settings, seed)
        c = self.counts
        c["responses"] += len(out.texts)
        c["upstream_tokens"] += first.num_tokens
        c["corrector_tokens"] += out.num_tokens
        c["upstream_seconds"] += t1 - t0
        c["corrector_seconds"] += time.perf_counter() - t1
        return out

    def cost(self) -> dict[str, float]:
        """Per response: tokens and seconds of the upstream policy and of the corrector."""
        c, n = self.counts, max(1, self.counts["responses"])
        return {"responses": c["responses"], "upstream_tokens_per_response": c["upstream_tokens"] / n,
                "corrector_tokens_per_response": c["corrector_tokens"] / n,
                "upstream_seconds_per_response": c["upstream_seconds"] / n,
                "corrector_seconds_per_response": c["corrector_seconds"] / n}


def corrector_settings(cfg, objectives: Sequence[str] | None = None) -> CorrectorSettings:
    task = cfg.task
    return CorrectorSettings(dict(task.descriptions), list(objectives or task.objectives),
                             cfg.method.weights_in_markers, task.template.chat, task.template.suffix)


def upstream_responder(cfg, model, tokenizer, stack_on: str):
    """What the corrector rewrites: ``base`` (the policy without preference, base weights), ``conditioned``
    (the policy as loaded, reading w from its prompt) or a run folder (that run's own responder, from
    its latest checkpoint)."""
    if stack_on == "base":
        return PlainPolicy(model, tokenizer, cfg.task.objectives, cfg.task.template.chat, cfg.task.template.suffix,
                           base=True)
    if stack_on == "conditioned":
        return ConditionedPolicy(model, Conditioner(cfg.task.template, list(cfg.task.objectives), tokenizer))
    from meal.harness.saved_run import load_run_responder

    return load_run_responder(stack_on)


def load_corrector_weights(run_dir: str, params: dict[str, torch.Tensor]) -> None:
    """The corrector's trained tensors from the run's latest checkpoint."""
    from safetensors.torch import load_file

    from meal.harness.checkpoint import CheckpointError, latest_checkpoint

    folder = latest_checkpoint(run_dir)
    if folder is None:
        raise ConfigError(f"run_dir: {run_dir} has no checkpoint holding a trained corrector")
    try:
        AdapterBag(params).load_state_dict(load_file(os.path.join(folder, "net.safetensors")))
    except Exception as e:  # noqa: BLE001 - any unreadable file is a corrupt checkpoint
        raise CheckpointError(f"checkpoint {folder}: the corrector's weights (net.safetensors) are corrupt or "
                              f"missing: {e} (nothing was changed)") from e


def responder(cfg, model, tokenizer, run_dir: str | None = None, stack_on: str | None = None) -> Corrected:
    """What evaluates a MetaAligner run: the corrector (trained weights from ``run_dir``) stacked on
    ``stack_on`` (default ``method.stack_on``)."""
    corrector, ctok, cparams = load_corrector(cfg)
    if run_dir is not None:
        load_corrector_weights(run_dir, cparams)
    corrector.eval()
    return Corrected(upstream_responder(cfg, model, tokenizer, stack_on or cfg.method.stack_on), corrector, ctok,
                     corrector_settings(cfg))


# ---------------------------------------------------------------------------------------------- training
def train(cfg) -> dict[str, Any]:
    """Train the corrector: Algorithm 1 on the conditioning corpus, then the three SFT stages."""
    t, m = cfg.trainer, cfg.method
    with start_run(cfg, optimizer=False) as run:  # 0. the corpus, its normalisation, the conditioned policy (cached)
        dist, objectives = run.dist, run.objectives
        if m.batch_size % dist.world or (m.batch_size // dist.world) % m.micro_batch_size:
            raise ConfigError(f"method.batch_size: {m.batch_size} rows a step do not split over {dist.world} "
                              f"processes in micro-batches of method.micro_batch_size = {m.micro_batch_size}")
        settings = corrector_settings(cfg)
        format_markers(objectives, settings.descriptions)  # every trained objective has its text
        data_path = os.path.join(run.run_dir, "metaaligner_data.jsonl")
        if run.progress.state is None:
            # 1. Algorithm 1 on the scored corpus (pairs within each prompt group)
            corpus = run.conditioning.corpus
            rng = random.Random(t.seed)
            rewards = run.scoring.normalizer(corpus.raw)
            pref, equal = build_dataset(corpus.texts, corpus.responses, rewards, corpus.groups, m.tolerance, rng,
                                        corpus.finished)
            rows = {"warmup": warmup_rows(equal, m.warmup_steps * m.batch_size, rng), "equal": equal,
                    "preference": pref}
            if dist.main:
                save_rows(data_path, rows)
            dist.barrier()
        rows = load_rows(data_path)
        log.info("MetaAligner data (tolerance %.2f): %d preference rows, %d equal rows, %d warm-up rows", m.tolerance,
                 len(rows["preference"]), len(rows["equal"]), len(rows["warmup"]))
        for stage, steps in zip(STAGES, (m.warmup_steps, m.equal_steps, m.preference_steps)):
            if steps and not rows[stage]:
                raise ConfigError(f"method.{stage}_steps: {steps} steps on an empty {stage} subset (the corpus gives "
                                  f"no such pairs at method.tolerance={m.tolerance}); set it to 0 or change the "
                                  f"tolerance")
        # 2. the corrector
        corrector, ctok, cparams = load_corrector(cfg, str(next(run.policy.model.parameters()).device))
        dist.broadcast(cparams.values())  # one start: LoRA's random init drew from each rank's own seed
        bag = AdapterBag(cparams)
        from meal.harness.distributed import AdamWStep

        optimizer = AdamWStep(cparams, m.lr, t.weight_decay, t.max_grad_norm, dist)
        if run.progress.state is not None:
            run.load_net(bag)
            optimizer.load_state_dict(run.progress.state["optimizer"])
        schedule = [s for s, n in zip(STAGES, (m.warmup_steps, m.equal_steps, m.preference_steps)) for _ in range(n)]
        order = {s: np.random.default_rng([t.seed, i]).permutation(len(rows[s])) for i, s in enumerate(STAGES)}
        seen = {s: schedule[:run.progress.start].count(s) for s in STAGES}  # rows used so far by each stage
        corrector.train()
        # 3. three SFT stages: 3a warm-up (identity), 3b equal preference, 3c weak-to-strong correction
        for it in run.iterations(len(schedule)):
            tic = time.perf_counter()
            stage = schedule[it]
            perm, pos = order[stage], seen[stage] * m.batch_size
            batch_rows = [rows[stage][perm[(pos + i) % len(perm)]] for i in range(m.batch_size)]
            batch_rows = dist.shard(batch_rows)  # this process's share of the step's rows
            seen[stage] += 1
            prompts = [wrap(corrector_text(r.question, r.source, settings.row_markers(r), r.kind), ctok,
                            settings.chat, settings.suffix) for r in batch_rows]
            batch = build_batch(ctok, prompts, [r.target for r in batch_rows], [r.finished for r in batch_rows],
                                t.max_prompt_tokens)
            loss, grad_norm = policy_step(corrector, optimizer, batch, torch.ones(len(batch)), m.micro_batch_size,
                                          dist)
            run.progress.budget.steps += 1
            step = it + 1
            metrics = {"train/loss": loss, f"metaaligner/loss_{stage}": loss, "train/grad_norm": grad_norm,
                       "metaaligner/stage": float(STAGES.index(stage)), "train/processes": dist.world,
                       "train/rows_per_process": len(batch_rows), "time/iteration": time.perf_counter() - tic}
            run.end_iteration(step, len(schedule), metrics, optimizer, net=bag)
        corrector.eval()
        summary = {"run_dir": run.run_dir, "steps": len(schedule), **run.report.last}
        if t.final_eval:
            upstream = upstream_responder(cfg, run.policy.model, run.policy.tokenizer, m.stack_on)
            evaluated = Corrected(upstream, corrector, ctok, settings)
            summary.update(run.evaluate(evaluated))
            if m.zero_shot and dist.main:
                summary["zero_shot"] = zero_shot_table(cfg, evaluated, run.data.test, run.scoring.normalizer,
                                                       os.path.join(run.run_dir, "zero_shot"))
            dist.barrier()
        return summary


# --------------------------------------------------------------------------------------------- zero-shot
def zero_shot_table(cfg, corrected: Corrected, test, normalizer, out_dir: str, prompts: int | None = None,
                    seed: int = 0) -> dict[str, Any]:
    """Objectives never trained, asked for in text: the mean raw reward of every trained and zero-shot
    objective for the upstream's answers and for the corrector asked for (a) the trained objectives,
    (b) each zero-shot objective alone, (c) all of them. Writes zero_shot.json and zero_shot.md."""
    from omegaconf import OmegaConf

    from meal.harness.settings import eval_texts, generation_settings
    from meal.rewards import RewardSet

    trained = list(cfg.task.objectives)
    unseen = [x for x in cfg.method.zero_shot if x not in trained]
    names = trained + unseen
    rewards = RewardSet.from_config(OmegaConf.to_container(cfg.rewards, resolve=True), names)
    texts = eval_texts(cfg, test, prompts)
    gen = generation_settings(cfg, eval_protocol=True)
    uniform = torch.full((len(texts), len(trained)), 1.0 / len(trained))
    first = corrected.upstream.respond(texts, uniform, gen, seed)
    all_settings = CorrectorSettings(corrected.settings.descriptions, names, corrected.settings.weights_in_markers,
                                     corrected.settings.chat, corrected.settings.suffix)
    asks = {"uncorrected": None, "trained objectives": trained, **{f"{u} only": [u] for u in unseen},
            "trained + " + " + ".join(unseen): names}
    rows = {}
    for label, ask in asks.items():
        if ask is None:
            out = first.texts
        else:
            w = [1.0 / len(ask) if x in ask else 0.0 for x in names]
            out = corrected.rewrite(texts, first.texts, [all_settings.markers(w)] * len(texts), gen, seed).texts
        raw = rewards.score(texts, out)  # (B, K')
        rows[label] = {"asked": ask, "mean_raw": {x: float(raw[:, j].mean()) for j, x in enumerate(names)},
                       "mean_normalised": {x: float(v) for x, v in zip(trained, normalizer(raw[:, :len(trained)])
                                                                       .mean(0).tolist())}}
    result = {"trained": trained, "zero_shot": unseen, "prompts": len(texts), "rows": rows}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "zero_shot.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out_dir, "zero_shot.md"), "w") as f:
        f.write(zero_shot_markdown(result))
    return result


def zero_shot_markdown(result: dict[str, Any]) -> str:
    names = result["trained"] + result["zero_shot"]
    lines = [f"Mean raw reward on {result['prompts']} test prompts (zero-shot objectives: "
             f"{', '.join(result['zero_shot']) or 'none'}); the corrector rewrites the same upstream answers.", "",
             "| responses | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    base = result["rows"]["uncorrected"]["mean_raw"]
    for label, row in result["rows"].items():
        cells = [f"{row['mean_raw'][x]:.3f}" + ("" if label == "uncorrected" else
                                                  f" ({row['mean_raw'][x] - base[x]:+.3f})") for x in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


METHOD = Method("metaaligner", MetaAlignerConfig, train, responder, check_config,
                not_exportable="MetaAligner answers with two models (a policy and its corrector)", stacks=True)
