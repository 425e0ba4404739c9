"""Meal and its static special case (lam = 1), read top to bottom.

One iteration (numbers are the steps of ``method.md``; step 0, the conditioning stage, ran in
:func:`meal.harness.start_run`)::

    1  w*  ~ Dirichlet(alpha)                          target preferences        (B, K)
    2  w_phi = net([e(x) ; w*])                        meta-learner proposal     (B, K)
    3  w~ = lam w* + (1 - lam) w_phi                   sampling preference       (B, K)
    4  y_ij ~ pi(. | x_i, w~_i), R_ij, keep argmax w~_i . R_ij                  (B, N) -> (B, m)
    5  w^lab = lam w~ + (1 - lam) softmax(R_i / tau)   training label            (B, K)
    6  L_in = mean_i c_i(phi) l_i(theta)               weighted SFT loss
    7-9    virtual step, meta loss on the meta half, Adam step of the net    (lam < 1)
    10 AdamW step of the policy on L_in with the updated, detached c, plus ``trainer.replay`` labelled
       rows of the conditioning stage at weight 1 (RiC's online stage mixes original samples in likewise)
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from meal.config import ConfigError
from meal.harness import Run, start_run
from meal.losses import SFTBatch, build_batch, per_example_nll, policy_step
from meal.meta import (PreferenceWeightNet, achieved_preference, dynamic_preference, label_preference,
                       masked_ones, meta_gradient, sample_weights)
from meal.profiling import PhaseMeter
from meal.rollout import ConditionedPolicy, Conditioner, PromptOrder, Rollout, draw_preferences, rollout
from meal.sampling import degenerate_mask, scalarise, select_valid_best

log = logging.getLogger(__name__)


@dataclass
class MetaLearner:
    """The preference-weight-net, its optimiser and the frozen embeddings of the training prompts (M, D)."""

    net: PreferenceWeightNet
    optimizer: torch.optim.Optimizer
    embeddings: torch.Tensor


@dataclass
class Kept:
    """What step 4 kept for one iteration: per kept response its prompt (B*m,), normalised rewards
    (B*m, K), whether it is valid (B*m,), label (B*m, K) and the SFT batch with that label."""

    src: torch.Tensor
    rewards: torch.Tensor
    ok: torch.Tensor
    labels: torch.Tensor
    batch: SFTBatch


def responder(cfg, model, tokenizer, run_dir: str | None = None) -> ConditionedPolicy:
    """What evaluates a Meal or static policy: w written into the prompt (and the adapters' mix)."""
    return ConditionedPolicy(model, Conditioner(cfg.task.template, list(cfg.task.objectives), tokenizer))


def train(cfg) -> dict[str, Any]:
    """Train a preference-conditioned policy with Meal (or static rejection sampling, lam = 1)."""
    t, m = cfg.trainer, cfg.method
    run = start_run(cfg, embed=m.weight_net.embedding if m.meta_learner else None)
    dist, k = run.dist, len(run.objectives)
    if m.lam < 1 and t.batch_size // dist.world < 2:
        raise ConfigError(f"trainer.batch_size: Meal needs at least 2 prompts per process, got {t.batch_size} over "
                          f"{dist.world}")
    policy = responder(cfg, run.model, run.tokenizer)
    optimizer = run.optimizer
    meta = build_meta_learner(cfg, run) if m.meta_learner else None
    replay = run.conditioning.replay if run.conditioning is not None and t.replay else None
    if t.replay and replay is None:
        log.info("trainer.replay=%d: this run has no conditioning stage, so no rows to replay", t.replay)
    replay_order = PromptOrder(len(replay) if replay is not None else 0, t.seed + 2)
    if run.state is not None:
        optimizer.load_state_dict(run.state["optimizer"])
        if meta is not None:
            run.load_net(meta.net)
            meta.optimizer.load_state_dict(run.state["net_optimizer"])
        replay_order = PromptOrder(replay_order.n, t.seed + 2, **(run.state.get("replay_order") or {}))
    meter = PhaseMeter(next(run.model.parameters()).device)
    texts_all = run.train_texts
    exit_code = 1
    try:
        for it in run.iterations():
            tic = time.perf_counter()
            # 1. target preferences (B, K) for the global batch; this rank keeps its share
            idx = run.order.next(t.batch_size)
            w_star = draw_preferences(len(idx), k, t.dirichlet_alpha, run.draws, t.preference)
            idx, w_star = dist.shard(idx), torch.cat(dist.shard(list(w_star.split(1))))
            texts = [texts_all[i] for i in idx]
            # 2-3. the net's proposal and the preference the policy samples under
            w_phi = meta.net(meta.embeddings[idx], w_star).detach() if meta is not None else w_star
            w_tilde = dynamic_preference(w_star, w_phi, m.lam)
            # 4. rejection sampling: N responses each, scored, best valid one by w~ . R
            ro = rollout(policy, texts, w_tilde, t.n_samples, run.settings, run.reward_set, run.normalizer,
                         meter=meter)
            run.budget.add_sampling(t.batch_size * t.n_samples, round(dist.mean(ro.num_tokens) * dist.world), k)
            valid = ~degenerate_mask(ro.texts, ro.finished)  # (B, N): an empty or looping response is never kept
            # 5. achieved preference and the label the policy is trained with
            kept = keep_and_label(run, ro, texts, w_tilde, valid, m.lam, m.tau, t.top_m)
            metrics: dict[str, float] = {}
            # 6-9. the meta step on (inner half, meta half) of the batch
            if meta is not None and m.lam < 1.0 and it % m.meta_interval == 0:
                metrics.update(meta_step(cfg, run, meta, idx, w_star, kept, ro, valid, texts, meter))
                run.budget.meta_steps += 1
            # 10. real update with the new, detached sample weights (0 where nothing valid was kept), and
            #     rows of the conditioning stage with their labels at weight 1
            with torch.no_grad():
                c = (sample_weights(meta.net(meta.embeddings[idx], w_star)[kept.src], kept.rewards, m.lam, kept.ok)
                     if meta is not None else masked_ones(kept.ok))
            batch, c = with_replay(run, kept, c, replay, replay_order)
            if dist.mean(float(kept.ok.any())) == 0:  # every response of the batch degenerate: no step at all
                log.warning("iteration %d: every sampled response was empty or looping; no step taken", it + 1)
                loss, grad_norm = 0.0, 0.0
            else:
                with meter.phase("real_step"):
                    loss, grad_norm = policy_step(run.model, optimizer, batch, c, t.micro_batch_size, dist)
                run.budget.steps += 1
            step = it + 1
            metrics.update(run.ctx.iteration_metrics(ro, kept.rewards, w_star, w_phi if meta is not None else None,
                                                     loss, grad_norm, c[:len(kept.batch)]))
            metrics.update(meter.pop())
            metrics["time/iteration"] = time.perf_counter() - tic
            metrics["train/kept_valid"] = kept.ok.float().mean().item()
            metrics["train/degenerate"] = (~valid).float().mean().item()
            metrics["train/processes"] = dist.world
            metrics["train/replay_rows"] = len(batch) - len(kept.batch)
            # a non-finite loss stops the run here; then log, checkpoint, periodic evaluation
            run.end_iteration(step, t.iterations, loss, metrics, optimizer, responder=policy,
                              table=(texts, w_tilde, ro),
                              net=meta.net if meta is not None else None,
                              net_optimizer=meta.optimizer.state_dict() if meta is not None else None,
                              replay_order=replay_order.state)
        summary = {"run_dir": run.run_dir, "iterations": t.iterations, **run.ctx.last}
        if t.final_eval:
            summary.update(run.evaluate(policy))
        exit_code = 0
        return summary
    finally:
        run.logger.finish(exit_code)
        if run.settings.sampler is not None:
            run.settings.sampler.close()  # the vLLM backend's adapter folder


def build_meta_learner(cfg, run: Run) -> MetaLearner:
    """Step 2's net over the frozen prompt embeddings of the base policy, initialised from its own
    generator (building it leaves the training random stream untouched), and its Adam optimiser (step 9)."""
    wn = cfg.method.weight_net
    emb = run.embeddings  # (M, D), taken by start_run before any weight changed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.trainer.seed + 1)
        net = PreferenceWeightNet(emb.shape[1], len(run.objectives), wn.hidden)
    return MetaLearner(net, torch.optim.Adam(net.parameters(), lr=wn.lr), emb)


def keep_and_label(run: Run, ro: Rollout, texts: list[str], w_tilde: torch.Tensor, valid: torch.Tensor,
                   lam: float, tau: float, top_m: int) -> Kept:
    """Steps 4-5: the best valid responses by w~ . R, labelled lam w~ + (1 - lam) softmax(R / tau)."""
    k = len(run.objectives)
    keep, ok = select_valid_best(scalarise(w_tilde, ro.rewards), valid, top_m)  # (B, m)
    rows = torch.arange(len(texts)).unsqueeze(1).expand_as(keep)  # (B, m)
    r_kept = ro.rewards[rows, keep].reshape(-1, k)  # (B*m, K)
    src = rows.reshape(-1)  # prompt of each kept response
    w_lab = label_preference(w_tilde[src], achieved_preference(r_kept, tau), lam)
    pairs = list(zip(src.tolist(), keep.reshape(-1).tolist()))
    batch = build_batch(run.tokenizer, run.condition([texts[i] for i in src], w_lab),
                        [ro.texts[b][j] for b, j in pairs], [ro.finished[b][j] for b, j in pairs],
                        run.cfg.trainer.max_prompt_tokens, prefs=w_lab)
    return Kept(src, r_kept, ok.reshape(-1), w_lab, batch)


def with_replay(run: Run, kept: Kept, c: torch.Tensor, replay, order: PromptOrder) -> tuple[SFTBatch, torch.Tensor]:
    """The real step's batch: the kept responses (weights ``c``), then ``trainer.replay`` rows of the
    conditioning stage with their labels (weight 1 each)."""
    if replay is None:
        return kept.batch, c
    pos = run.dist.shard(order.next(run.cfg.trainer.replay))
    w_rep = replay.labels[pos]
    other = build_batch(run.tokenizer, run.condition([replay.texts[i] for i in pos], w_rep),
                        [replay.responses[i] for i in pos], [replay.finished[i] for i in pos],
                        run.cfg.trainer.max_prompt_tokens, prefs=w_rep)
    return concat_batches(kept.batch, other, run.tokenizer.pad_token_id), torch.cat([c, torch.ones(len(pos))])


def concat_batches(a: SFTBatch, b: SFTBatch, pad_id: int) -> SFTBatch:
    """Two right-padded batches as one (padded to the wider)."""
    from meal.losses import IGNORE

    width = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def widen(x: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=fill)

    prefs = None if a.prefs is None or b.prefs is None else torch.cat([a.prefs, b.prefs])
    return SFTBatch(torch.cat([widen(a.input_ids, pad_id), widen(b.input_ids, pad_id)]),
                    torch.cat([widen(a.attention_mask, 0), widen(b.attention_mask, 0)]),
                    torch.cat([widen(a.labels, IGNORE), widen(b.labels, IGNORE)]), prefs)


def meta_step(cfg, run: Run, meta: MetaLearner, idx: list[int], w_star: torch.Tensor, kept: Kept, ro: Rollout,
              valid: torch.Tensor, texts: list[str], meter) -> dict[str, float]:
    """Steps 6-9: virtual step on the inner half, meta loss on the meta half, Adam step of the net.

    The batch's prompts are split in two: the first half is the inner batch (its kept responses
    and their labels), the second the meta batch (its best response under the target w*, or all
    its samples weighted by advantage).
    """
    m, t = cfg.method, cfg.trainer
    device = next(run.model.parameters()).device
    emb = meta.embeddings[idx]
    b = len(texts)
    half = b // 2
    inner_rows = (kept.src < half).nonzero().flatten()
    inner = kept.batch.slice(inner_rows).to(device)

    def c_fn() -> torch.Tensor:  # c_i(phi) for the inner examples, graph to phi
        return sample_weights(meta.net(emb, w_star)[kept.src[inner_rows]], kept.rewards[inner_rows], m.lam,
                              kept.ok[inner_rows]).to(device)

    meta_idx = list(range(half, b))
    scores = scalarise(w_star[meta_idx], ro.rewards[meta_idx])  # (B_meta, N) under the target
    if m.meta_objective == "best":  # the best valid response under the target (none: weight 0)
        best, good = select_valid_best(scores, valid[meta_idx])
        best, good = best[:, 0].tolist(), good[:, 0].float()
        resp = [ro.texts[i][j] for i, j in zip(meta_idx, best)]
        done = [ro.finished[i][j] for i, j in zip(meta_idx, best)]
        prefs = w_star[meta_idx]
        weights = good / good.sum().clamp_min(1.0)
    else:  # advantage: every sample, weighted by its group-normalised target score
        n = scores.shape[1]
        adv = (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True).nan_to_num(1.0).clamp_min(1e-6)
        resp = [ro.texts[i][j] for i in meta_idx for j in range(n)]
        done = [ro.finished[i][j] for i in meta_idx for j in range(n)]
        prefs = w_star[meta_idx].repeat_interleave(n, 0)
        weights = adv.reshape(-1) / adv.numel()
    prompts = run.condition([texts[i] for i in meta_idx for _ in range(len(prefs) // len(meta_idx))], prefs)
    meta_batch = build_batch(run.tokenizer, prompts, resp, done, t.max_prompt_tokens, prefs=prefs).to(device)
    weights = weights.to(device)

    def meta_loss_fn(p) -> torch.Tensor:
        return (weights * per_example_nll(run.model, meta_batch, p)).sum()

    meta.optimizer.zero_grad(set_to_none=True)
    kernel = contextlib.nullcontext()
    if m.engine == "autograd" or m.directional_mode == "jvp":
        # double backward and forward-mode AD are implemented by the math SDPA kernel only
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = sdpa_kernel(SDPBackend.MATH)
    with kernel:
        res = meta_gradient(run.model, run.params, inner, c_fn, meta_loss_fn, m.alpha_in, list(meta.net.parameters()),
                            m.engine, m.directional_mode, m.fd_eps, m.first_order, t.micro_batch_size, meter)
    run.dist.average_grads(meta.net.parameters())  # the meta-gradient, averaged over data-parallel ranks
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in meta.net.parameters() if p.grad is not None)).item()
    meta.optimizer.step()
    return {"meta/loss": res.meta_loss, "meta/grad_norm": grad_norm}
