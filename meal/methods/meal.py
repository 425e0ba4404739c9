"""Meal and its static special case (lam = 1), read top to bottom.

One iteration (numbers are the steps of ``method.md``; step 0, the conditioning stage, ran in
:func:`meal.harness.run.start_run`); the learner is :mod:`meal.methods.meta_learner`::

    1  w*  ~ Dirichlet(alpha)                           target preferences        (B, K)
    2  w_phi = learner.propose(x, w*)                   meta-learner proposal     (B, K)
    3  w~ = lam w* + (1 - lam) w_phi                    sampling preference       (B, K)
    4  y_ij ~ pi(. | x_i, w~_i), R_ij, keep argmax w~_i . R_ij                   (B, N) -> (B, m)
    5  w^lab = lam w~ + (1 - lam) h_phi(x, w*, R)       training label            (B*m, K)
    6  L_in = mean_i c_i(phi) l_i(theta, w^lab_i(phi))  SFT loss, phi by the label (and weight) path
    7-9    virtual step, meta loss on the meta half, scale-free Adam step of the net   (lam < 1)
    10 AdamW step of the policy on L_in with the new, detached labels and weights, plus ``trainer.replay``
       labelled rows of the conditioning stage at weight 1 (RiC's online stage mixes original samples in likewise)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from meal.config import ConfigError, knob, need
from meal.harness.corpus import ReplaySet
from meal.harness.distributed import AdamWStep
from meal.harness.profiling import PhaseMeter
from meal.harness.run import Run, start_run
from meal.methods import Method
from meal.methods.bilevel import dynamic_preference
from meal.methods.meta_learner import (IterationBatch, Kept, MetaSettings, NetShape, PolicyHandle, build_learner,
                                       labelled_batch)
from meal.policy.losses import SFTBatch, build_batch, policy_step
from meal.policy.rollout import (ConditionedPolicy, Conditioner, OnlineSampling, PromptOrder, Rollout, draw_preferences,
                                 rollout)
from meal.policy.sampling import degenerate_mask, scalarise, select_valid_best

log = logging.getLogger(__name__)


@dataclass
class WeightNetConfig:
    """The preference-weight-net (meta-learner), method.md steps 2, 5 and 9."""

    hidden: int = knob(128, "Hidden units of each head's one-hidden-layer MLP.")
    embedding: str = knob("policy", "policy (mean-pooled last hidden state of the frozen base policy) | minilm.")
    features: int = knob(32, "Principal directions of the centred prompt embeddings the net sees, whitened (PCA fitted "
                         "on the training prompts before training; 0: all).")
    lr: float = knob(1e-3, "Adam learning rate beta of the outer update (step 9).")
    adam_eps: float = knob(1e-16, "Adam's eps, far below the meta-gradient's scale (1e-10 and less): the outer update "
                           "is scale-free, so the size of the hypergradient (alpha_in, (1 - lam) factors) does not "
                           "decide whether the net moves.")


@dataclass
class MethodConfig:
    """Meal and its static special case (lam = 1): the recipe meal/methods/meal.py."""

    recipe: str = knob("meal", "Which recipe of meal/methods trains the run (meal: Meal and static).")
    name: str = knob("meal", "Label of the method in run names and comparisons.")
    meta_learner: bool = knob(True, "Build the preference-weight-net (False: the static method, no net at all).")
    lam: float = knob(0.5, "lambda: mix of target and net preference (1 = static rejection sampling).")
    tau: float = knob(1.0, "Temperature of the achieved preference softmax(R / tau) (step 5).")
    label_path: bool = knob(True, "phi reaches the inner loss through the label each kept response is trained under "
                            "(needs preference-aware LoRA; with the preference in the prompt only it carries nothing).")
    weight_path: bool = knob(False, "phi reaches the inner loss through the sample weight c_i = lam + (1 - lam) "
                             "w_phi . sigmoid(R_i) / mean (the earlier Meal's only path).")
    control: str = knob("none", "A control that isolates the net: none | frozen (the net at its initialisation, never "
                        "updated) | uniform (w_phi = the uniform preference, labels the fixed hindsight rule, no net) "
                        "| shuffled (the net learns; the policy sees its outputs permuted across the batch's prompts).")
    alpha_in: Optional[float] = knob(None, "Step size of the one-step virtual update (step 7); None: the real step's "
                                     "trainer.lr.")
    precondition: str = knob("adam", "P of the virtual step: adam (AdamW's current 1 / (sqrt(v^) + eps), detached, as "
                             "the real step) | none (plain SGD, as Meta-Weight-Net).")
    engine: str = knob("directional", "Meta-gradient engine: directional | autograd (same answer, see BENCHMARKS.md).")
    directional_mode: str = knob("per_example", "How the directional engine gets grad l_i . P v: per_example "
                                 "(kept gradients) | jvp (forward mode) | fd (central difference).")
    fd_eps: float = knob(3e-2, "Finite-difference step, relative to the norm of the parameters along P v.")
    meta_objective: str = knob("best", "best (NLL of the best-of-N under the target) | advantage.")
    meta_interval: int = knob(1, "Run the meta step (7-9) every this many iterations.")
    meta_updates: int = knob(1, "Repeat steps 7-9 this many times on the same sampled batch (no extra generation).")
    first_order: bool = knob(False, "Approximation: take the meta-loss gradient at theta instead of theta'.")
    weight_net: WeightNetConfig = field(default_factory=WeightNetConfig, metadata={"help": "Meta-learner."})


def check_config(tr, cfg) -> None:
    t = cfg.trainer
    need(0.0 <= tr.lam <= 1.0, "method.lam", f"lambda must be in [0, 1], got {tr.lam}")
    need(tr.tau > 0, "method.tau", f"must be > 0, got {tr.tau}")
    need(tr.alpha_in is None or tr.alpha_in > 0, "method.alpha_in", f"must be > 0, got {tr.alpha_in}")
    need(tr.precondition in ("adam", "none"), "method.precondition", f"adam | none, got {tr.precondition!r}")
    need(tr.control in ("none", "frozen", "uniform", "shuffled"), "method.control",
         f"none | frozen | uniform | shuffled, got {tr.control!r}")
    need(tr.engine in ("directional", "autograd"), "method.engine", f"directional | autograd, got {tr.engine!r}")
    need(tr.directional_mode in ("fd", "jvp", "per_example"), "method.directional_mode",
         f"fd | jvp | per_example, got {tr.directional_mode!r}")
    need(tr.meta_objective in ("best", "advantage"), "method.meta_objective",
         f"best | advantage, got {tr.meta_objective!r}")
    need(tr.meta_interval >= 1, "method.meta_interval", f"must be >= 1, got {tr.meta_interval}")
    need(tr.meta_updates >= 1, "method.meta_updates", f"must be >= 1, got {tr.meta_updates}")
    need(tr.weight_net.embedding in ("policy", "minilm"), "method.weight_net.embedding",
         f"policy | minilm, got {tr.weight_net.embedding!r}")
    need(tr.weight_net.features >= 0, "method.weight_net.features", f"must be >= 0, got {tr.weight_net.features}")
    need(tr.weight_net.adam_eps > 0, "method.weight_net.adam_eps", f"must be > 0, got {tr.weight_net.adam_eps}")
    if not tr.meta_learner:
        need(tr.lam == 1, "method.lam", f"lambda = {tr.lam} needs the preference-weight-net (method=meal); the static "
             f"method is lambda = 1 (the net's controls: method.control=frozen | uniform | shuffled)")
        return
    need(tr.lam < 1, "method.lam", "with lambda = 1 the preference-weight-net never receives a gradient (every "
         "sample weight is 1): that is the static method, method=static")
    if tr.control in ("frozen", "uniform"):
        return  # nothing learns: no gradient path is needed
    label = tr.label_path and cfg.policy.lora.preference_aware
    need(label or tr.weight_path, "method.label_path", "no path carries the meta-gradient: the label path needs "
         "preference-aware LoRA (policy.lora.preference_aware=true; with the preference in the prompt only, a label "
         "is text), else turn on method.weight_path=true")
    if tr.weight_path and not label:
        # the sample weights are normalised to mean 1 over the inner half of the batch: with one inner
        # example they are constant in phi and the meta-gradient is exactly 0
        inner = (t.batch_size // 2) * t.top_m
        need(inner >= 2, "trainer.batch_size", f"Meal splits each batch into an inner and a meta half; the inner "
             f"half holds batch_size // 2 * top_m = {inner} kept response(s), and weights normalised over fewer "
             f"than 2 give the net no gradient: needs batch_size >= 4 (or top_m >= 2)")


def responder(cfg, model, tokenizer, run_dir: str | None = None) -> ConditionedPolicy:
    """What evaluates a Meal or static policy: w written into the prompt (and the adapters' mix)."""
    return ConditionedPolicy(model, Conditioner(cfg.task.template, list(cfg.task.objectives), tokenizer))


def meta_settings(cfg) -> MetaSettings:
    """The learner's settings from ``cfg.method`` (alpha_in defaults to the real step's learning rate)."""
    m, t = cfg.method, cfg.trainer
    return MetaSettings(lam=m.lam, tau=m.tau, alpha_in=m.alpha_in if m.alpha_in is not None else t.lr,
                        precondition=m.precondition, engine=m.engine, mode=m.directional_mode, fd_eps=m.fd_eps,
                        first_order=m.first_order, meta_objective=m.meta_objective, label_path=m.label_path,
                        weight_path=m.weight_path, control=m.control, micro_batch_size=t.micro_batch_size,
                        seed=t.seed + 3)


def net_shape(cfg) -> NetShape:
    """The net's size and outer optimiser from ``cfg.method.weight_net``."""
    n = cfg.method.weight_net
    return NetShape(n.hidden, n.features, n.lr, n.adam_eps)


def train(cfg) -> dict[str, Any]:
    """Train a preference-conditioned policy with Meal (or static rejection sampling, lam = 1)."""
    t, m = cfg.trainer, cfg.method
    uses_net = m.meta_learner and m.lam < 1 and m.control != "uniform"
    with start_run(cfg, embed=m.weight_net.embedding if uses_net else None) as run:
        dist, k = run.dist, len(run.objectives)
        if m.lam < 1 and t.batch_size // dist.world < 2:
            raise ConfigError(f"trainer.batch_size: Meal needs at least 2 prompts per process, got {t.batch_size} over "
                              f"{dist.world}")
        # a process holds its share of each half of the batch: the meta step's inner and meta halves (5-9) are
        # then the global batch's on any number of processes (static: a contiguous share)
        halves = m.lam < 1 and dist.world > 1
        shard = dist.shard_halves if halves else dist.shard
        if halves and t.batch_size % (2 * dist.world):
            raise ConfigError(f"trainer.batch_size: Meal shards the inner and the meta half of the batch over the "
                              f"processes; {t.batch_size} prompts do not split into 2 x {dist.world} equal shares")
        lm = run.policy  # the language model: its tokenizer, trainable tensors, template, sampling, optimiser
        budget, saved = run.progress.budget, run.progress.state  # saved: the checkpoint's state (a resume)
        policy = responder(cfg, lm.model, lm.tokenizer)
        optimizer = lm.optimizer
        learner = build_learner(meta_settings(cfg), k, lm.embeddings, net_shape(cfg), t.seed + 1)
        handle = PolicyHandle(lm.model, lm.params, lm.tokenizer, lm.condition, optimizer, t.max_prompt_tokens)
        if learner.learns and m.precondition == "adam" and not isinstance(optimizer, AdamWStep):
            log.warning("method.precondition=adam: the %s keeps AdamW's moments partitioned, so the virtual step is "
                        "preconditioned by the current inner gradient's scale (Adam's first-step scale) at every "
                        "iteration", type(optimizer).__name__)
        replay = run.conditioning.replay if run.conditioning is not None and t.replay else None
        if t.replay and replay is None:
            log.info("trainer.replay=%d: this run has no conditioning stage, so no rows to replay", t.replay)
        replay_order = PromptOrder(len(replay) if replay is not None else 0, t.seed + 2)
        net = getattr(learner, "net", None)  # Meal's preference-weight-net (also the frozen and shuffled controls')
        if saved is not None:
            optimizer.load_state_dict(saved["optimizer"])
            if net is not None:
                learner.load(saved, run.net_state())
            replay_order = PromptOrder(replay_order.n, t.seed + 2, **(saved.get("replay_order") or {}))
        meter = PhaseMeter(next(lm.model.parameters()).device)
        texts_all = run.train_texts
        online = OnlineSampling.build(lm.settings, t.seeding, t.seed)
        for it in run.iterations():
            tic = time.perf_counter()
            # 1. target preferences (B, K) for the global batch; this rank keeps its share
            idx = run.progress.order.next(t.batch_size)
            w_star = draw_preferences(len(idx), k, t.dirichlet_alpha, run.progress.draws, t.preference)
            idx, w_star = shard(idx), torch.cat(shard(list(w_star.split(1))))
            texts = [texts_all[i] for i in idx]
            learner.begin(it, len(idx))
            # 2-3. the net's proposal and the preference the policy samples under
            w_phi = learner.propose(idx, w_star)
            w_tilde = dynamic_preference(w_star, w_phi, m.lam)
            # 4. rejection sampling: N responses each, scored, best valid one by w~ . R
            ro = rollout(policy, online.queries(texts, w_tilde, t.n_samples, it), online.settings, run.scoring, meter)
            budget.add_sampling(t.batch_size * t.n_samples, round(dist.mean(ro.num_tokens) * dist.world), k)
            valid = ~degenerate_mask(ro.texts, ro.finished)  # (B, N): an empty or looping response is never kept
            kept = keep_best(ro, w_tilde, valid, t.top_m)
            metrics: dict[str, float] = {}
            # 5-9. labels and weights as functions of phi; the meta step on (inner half, meta half) of the batch
            if learner.learns and it % m.meta_interval == 0:
                batch_it = IterationBatch(idx, texts, w_star, kept, ro.texts, ro.finished, ro.rewards, valid)
                for _ in range(m.meta_updates):  # the same samples, no extra generation
                    metrics.update(learner.step(batch_it, handle, dist, meter))
                    budget.meta_steps += 1
            # 10. real update with the new, detached labels and weights (0 where nothing valid was kept), and
            #     rows of the conditioning stage with their labels at weight 1
            labels = learner.labels(idx, w_star, kept)
            c = learner.weights(idx, w_star, kept, dist.batch_sum)
            batch, c = with_replay(run, labelled_batch(handle, texts, ro.texts, ro.finished, kept, labels), c,
                                   Replay(replay, replay_order, t.replay, t.max_prompt_tokens))
            if dist.mean(float(kept.ok.any())) == 0:  # every response of the batch degenerate: no step at all
                log.warning("iteration %d: every sampled response was empty or looping; no step taken", it + 1)
                loss, grad_norm = 0.0, 0.0
            else:
                with meter.phase("real_step"):
                    loss, grad_norm = policy_step(lm.model, optimizer, batch, c, t.micro_batch_size, dist)
                budget.steps += 1
            step = it + 1
            batch_means = run.report.iteration_metrics(ro, kept.rewards, w_star, w_phi if m.lam < 1 else None,
                                                       loss, grad_norm, c[:len(kept.src)])
            batch_means["meta/label_shift"] = (labels - w_star[kept.src]).abs().sum(-1).mean().item()
            batch_means["train/kept_valid"] = kept.ok.float().mean().item()
            batch_means["train/degenerate"] = (~valid).float().mean().item()
            metrics.update(dist.mean_values(batch_means))  # the global batch's, not this process's share
            diagnostics = learner.diagnostics()  # what the net did: distance from its init, spread over prompts
            metrics.update(diagnostics)
            run.report.diagnostics = diagnostics or None
            metrics.update(meter.pop())
            metrics["time/iteration"] = time.perf_counter() - tic
            metrics["train/processes"] = dist.world
            metrics["train/replay_rows"] = len(batch) - len(kept.src)
            # a non-finite loss stops the run here; then log, checkpoint, periodic evaluation
            run.end_iteration(step, t.iterations, metrics, optimizer, responder=policy,
                              table=(texts, w_tilde, ro), net=net,
                              replay_order=replay_order.state, **(learner.state() if net is not None else {}))
        summary = {"run_dir": run.run_dir, "iterations": t.iterations, **run.report.last}
        if t.final_eval:
            summary.update(run.evaluate(policy))
        return summary


def keep_best(ro: Rollout, w_tilde: torch.Tensor, valid: torch.Tensor, top_m: int) -> Kept:
    """Step 4's selection: the best valid responses of each prompt by w~ . R (B, m), flattened."""
    k = ro.rewards.shape[-1]
    keep, ok = select_valid_best(scalarise(w_tilde, ro.rewards), valid, top_m)  # (B, m)
    rows = torch.arange(keep.shape[0]).unsqueeze(1).expand_as(keep)  # (B, m)
    return Kept(rows.reshape(-1), ro.rewards[rows, keep].reshape(-1, k), ok.reshape(-1), keep.reshape(-1))


@dataclass
class Replay:
    """Step 10's rows of the conditioning stage (``rows``, None: the run has no stage): ``count`` a step
    (``trainer.replay``, global), drawn by ``order``, cut to ``max_prompt_tokens``."""

    rows: ReplaySet | None
    order: PromptOrder
    count: int
    max_prompt_tokens: int


def with_replay(run: Run, kept: SFTBatch, c: torch.Tensor, replay: Replay) -> tuple[SFTBatch, torch.Tensor]:
    """The real step's batch: the kept responses (weights ``c``), then ``trainer.replay`` rows of the
    conditioning stage with their labels (weight 1 each)."""
    if replay.rows is None:
        return kept, c
    rows, pos = replay.rows, run.dist.shard(replay.order.next(replay.count))
    w_rep = rows.labels[pos]
    other = build_batch(run.policy.tokenizer, run.policy.condition([rows.texts[i] for i in pos], w_rep),
                        [rows.responses[i] for i in pos], [rows.finished[i] for i in pos],
                        replay.max_prompt_tokens, prefs=w_rep)
    return concat_batches(kept, other, run.policy.tokenizer.pad_token_id), torch.cat([c, torch.ones(len(pos))])


def concat_batches(a: SFTBatch, b: SFTBatch, pad_id: int) -> SFTBatch:
    """Two right-padded batches as one (padded to the wider)."""
    from meal.policy.losses import IGNORE

    width = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def widen(x: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=fill)

    prefs = None if a.prefs is None or b.prefs is None else torch.cat([a.prefs, b.prefs])
    return SFTBatch(torch.cat([widen(a.input_ids, pad_id), widen(b.input_ids, pad_id)]),
                    torch.cat([widen(a.attention_mask, 0), widen(b.attention_mask, 0)]),
                    torch.cat([widen(a.labels, IGNORE), widen(b.labels, IGNORE)]), prefs)


METHOD = Method("meal", MethodConfig, train, responder, check_config)
