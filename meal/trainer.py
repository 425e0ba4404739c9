"""The training loop of Meal and of its static special case (lam = 1), read top to bottom.

One iteration (numbers are the steps of ``method.md``)::

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
import math
import os
import time
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from meal.budget import Budget
from meal.checkpoint import load_checkpoint, rng_state, save_checkpoint
from meal.conditioning import condition_policy, conditioning_budget, read_conditioning, record_conditioning
from meal.config import ConfigError, TrainConfig, validate
from meal.distributed import Dist, deepspeed_config, make_policy_optimizer
from meal.harness import build_rewards, check_policy_source, load_task_data, open_run, write_run_config
from meal.embeddings import embed_prompts
from meal.losses import build_batch, per_example_nll, policy_step
from meal.meta import (PreferenceWeightNet, achieved_preference, dynamic_preference, label_preference,
                       masked_ones, meta_gradient, sample_weights)
from meal.policy import load_policy, resolve_device, resolve_dtype, trainable_parameters
from meal.profiling import PhaseMeter
from meal.rewards import RewardNormalizer
from meal.rollout import Conditioner, PromptOrder, draw_preferences, reward_statistics, rollout
from meal.run import RunContext, generation_settings, open_logger, seed_everything, training_sampler
from meal.sampling import degenerate_mask, scalarise, select_valid_best
from meal.tracking import NullLogger

log = logging.getLogger(__name__)


def as_config(cfg: Any) -> DictConfig:
    """Merge a (partial) config onto the typed schema, so tests can pass plain dicts."""
    if not isinstance(cfg, DictConfig) or OmegaConf.get_type(cfg) is dict:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
    OmegaConf.resolve(cfg)  # freeze interpolations (e.g. a timestamped out_dir) once
    return cfg


def train(cfg: Any) -> dict[str, Any]:
    """Train a preference-conditioned policy as configured; returns a summary of the run."""
    cfg = as_config(cfg)
    validate(cfg)
    t, m, task = cfg.trainer, cfg.method, cfg.task
    dist = Dist()
    if t.batch_size % dist.world or (m.lam < 1 and t.batch_size // dist.world < 2):
        raise ConfigError(f"trainer.batch_size: {t.batch_size} does not split over {dist.world} processes "
                          f"(each needs an equal share, at least 2 for Meal)")
    if t.replay % dist.world:
        raise ConfigError(f"trainer.replay: {t.replay} rows do not split over {dist.world} processes")
    run_dir = t.out_dir
    start_point = open_run(cfg)  # a new run, or the checkpoint to resume (config compared field by field)
    ckpt = start_point.checkpoint
    check_policy_source(cfg.policy)
    device_name = str(dist.device) if dist.device is not None and cfg.policy.device == "auto" else cfg.policy.device
    ds_config = deepspeed_config(t, dist, resolve_dtype(cfg.policy.dtype, resolve_device(device_name)))
    seed_everything(t.seed + dist.rank)  # sampling differs per rank; prompt order and w* draws do not
    data = load_task_data(cfg)
    objectives = list(task.objectives)
    k = len(objectives)
    reward_set = build_rewards(cfg)  # each reward tried on dummy responses before the policy loads
    if dist.main and ckpt is None:
        write_run_config(run_dir, cfg)
    model, tok = load_policy(cfg.policy, k, device=device_name)
    params = trainable_parameters(model)
    dist.broadcast(params.values())  # one starting point: LoRA's random init drew from each rank's own seed
    condition = Conditioner(task.template, objectives, tok)
    settings = generation_settings(cfg)
    settings.sampler = training_sampler(cfg, dist.rank, dist.world)
    conditioning = None
    if ckpt is None and cfg.conditioning.enabled:
        # 0. the conditioning stage (cached, shared by every run of the task): the policy learns to
        #    follow its preference; the statistics of its scored corpus become the run's. It runs
        #    before the optimiser is built, whose own copy of the weights (DeepSpeed's fp32 master)
        #    must start from the conditioned ones
        conditioning = condition_policy(cfg, data, model, params, condition, settings, reward_set, run_dir,
                                        lambda folder: open_logger(cfg, folder, False, stage=True), dist)
    optimizer = make_policy_optimizer(model, params, t, dist, ds_config)
    device = next(model.parameters()).device
    train_texts = [e.text for e in data.train]

    # the meta-learner, its frozen prompt embeddings and its optimiser (Meal only); the net is
    # initialised from its own generator so that building it leaves the training RNG untouched
    net, net_opt, emb = None, None, None
    if m.meta_learner:
        emb = embed_prompts(m.weight_net.embedding, model, tok, train_texts)  # (M, D)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(t.seed + 1)
            net = PreferenceWeightNet(emb.shape[1], k, m.weight_net.hidden)
        net_opt = torch.optim.Adam(net.parameters(), lr=m.weight_net.lr)

    ctx = RunContext(run_dir, cfg, objectives)
    meter = PhaseMeter(device)
    order = PromptOrder(len(train_texts), t.seed)
    rng = np.random.default_rng(t.seed)
    start = 0
    stats_path = os.path.join(run_dir, "reward_stats.json")
    budget = Budget()  # the online stage's cost (the conditioning stage's is reported apart)
    if ckpt is not None:
        state = load_checkpoint(ckpt, params, net, rank=dist.rank)
        if dist.main:  # the launch is good: now the run's record may say so
            write_run_config(run_dir, cfg)
            dropped = ctx.jsonl.truncate_after(state["step"])
            if dropped:
                log.info("metrics.jsonl: dropped %d record(s) past the checkpoint's step %d (done again now)",
                         dropped, state["step"])
        if len(state["rng"]) != dist.world:
            log.warning("the checkpoint was written by %d processes, this launch has %d: sampling does not "
                        "continue the saved random streams exactly", len(state["rng"]), dist.world)
        optimizer.load_state_dict(state["optimizer"])
        if net_opt is not None:
            net_opt.load_state_dict(state["net_optimizer"])
        order = PromptOrder(len(train_texts), t.seed, **state["order"])
        rng.bit_generator.state = state["numpy_draws"]
        start = state["step"]
        budget = Budget.from_dict(state.get("budget"))
        normalizer = RewardNormalizer.load(stats_path, objectives)
        conditioning = read_conditioning(run_dir)
        log.info("resumed %s at iteration %d", ckpt, start)
    elif conditioning is not None:
        normalizer = conditioning.normalizer
        if dist.main:
            normalizer.save(stats_path, {"source": "conditioning corpus", "stage": conditioning.folder})
            record_conditioning(run_dir, conditioning)
    else:
        normalizer = reward_statistics(cfg, model, condition, train_texts, settings, reward_set)
        if dist.main:
            normalizer.save(stats_path, {"source": "normalisation pass", "prompts": t.norm_prompts,
                                         "samples_per_prompt": t.norm_samples, "seed": t.norm_seed})
    ctx.budgets = {"online": budget, "conditioning": conditioning_budget(conditioning)}
    replay = conditioning.replay if conditioning is not None and t.replay else None
    if t.replay and replay is None:
        raise ConfigError(f"trainer.replay: {run_dir} holds no labelled rows of a conditioning stage to replay")
    saved_order = state.get("replay_order") if ckpt is not None else None
    replay_order = PromptOrder(len(replay) if replay is not None else 0, t.seed + 2, **(saved_order or {}))

    logger = open_logger(cfg, run_dir, resume=ckpt is not None) if dist.main else NullLogger()
    exit_code = 1
    try:
        for it in ctx.progress(start, t.iterations, show=dist.main):
            tic = time.perf_counter()
            # 1. target preferences (B, K) for the global batch; this rank keeps its share
            idx = order.next(t.batch_size)
            w_star = draw_preferences(len(idx), k, t.dirichlet_alpha, rng, t.preference)
            idx, w_star = dist.shard(idx), torch.cat(dist.shard(list(w_star.split(1))))
            texts = [train_texts[i] for i in idx]
            # 2-3. the net's proposal and the preference the policy samples under
            w_phi = net(emb[idx], w_star).detach() if net is not None else w_star
            w_tilde = dynamic_preference(w_star, w_phi, m.lam)
            # 4. rejection sampling: N responses each, scored, best by w~ . R
            ro = rollout(model, condition, texts, w_tilde, t.n_samples, settings, reward_set, normalizer,
                         meter=meter)
            budget.add_sampling(t.batch_size * t.n_samples, round(dist.mean(ro.num_tokens) * dist.world), k)
            valid = ~degenerate_mask(ro.texts, ro.finished)  # (B, N): an empty or looping response is never kept
            keep, ok = select_valid_best(scalarise(w_tilde, ro.rewards), valid, t.top_m)  # (B, m)
            rows = torch.arange(len(idx)).unsqueeze(1).expand_as(keep)  # (B, m)
            r_kept = ro.rewards[rows, keep].reshape(-1, k)  # (B*m, K)
            kept_src = rows.reshape(-1)  # prompt of each kept response
            ok = ok.reshape(-1)  # (B*m,) False: the prompt had no valid response left (weight 0)
            # 5. achieved preference and the label the policy is trained with
            w_lab = label_preference(w_tilde[kept_src], achieved_preference(r_kept, m.tau), m.lam)
            pairs = list(zip(rows.reshape(-1).tolist(), keep.reshape(-1).tolist()))
            batch_responses = [ro.texts[b][j] for b, j in pairs]
            batch_finished = [ro.finished[b][j] for b, j in pairs]
            prompts = condition([texts[i] for i in kept_src], w_lab)
            batch = build_batch(tok, prompts, batch_responses, batch_finished, t.max_prompt_tokens, prefs=w_lab)
            metrics: dict[str, float] = {}
            # 6-9. the meta step on (inner half, meta half) of the batch
            if net is not None and m.lam < 1.0 and it % m.meta_interval == 0:
                metrics.update(meta_step(cfg, model, params, net, net_opt, emb[idx], w_star, kept_src, r_kept, ok,
                                         batch, ro, valid, texts, condition, device, meter, dist))
                budget.meta_steps += 1
            # 10. real update with the new, detached sample weights (0 where nothing valid was kept)
            with torch.no_grad():
                w_new = net(emb[idx], w_star)[kept_src] if net is not None else None
                c = sample_weights(w_new, r_kept, m.lam, ok) if w_new is not None else masked_ones(ok)
            real, c_replay = batch, torch.zeros(0)
            if replay is not None:  # rows of the conditioning stage join the step, with their labels, weight 1
                pos = dist.shard(replay_order.next(t.replay))
                w_rep = replay.labels[pos]
                real = build_batch(tok, prompts + condition([replay.texts[i] for i in pos], w_rep),
                                   batch_responses + [replay.responses[i] for i in pos],
                                   batch_finished + [replay.finished[i] for i in pos],
                                   t.max_prompt_tokens, prefs=torch.cat([w_lab, w_rep]))
                c_replay = torch.ones(len(pos))
            if dist.mean(float(ok.any())) == 0:  # every response of the batch degenerate: no step at all
                log.warning("iteration %d: every sampled response was empty or looping; no step taken", it + 1)
                loss, grad_norm = 0.0, 0.0
            else:
                with meter.phase("real_step"):
                    loss, grad_norm = policy_step(model, optimizer, real, torch.cat([c, c_replay]),
                                                  t.micro_batch_size, dist)
                budget.steps += 1
            if not math.isfinite(loss):
                raise FloatingPointError(f"iteration {it}: the training loss is {loss}; the last checkpoint "
                                         f"in {run_dir}/checkpoints is intact")
            step = it + 1
            metrics.update(ctx.iteration_metrics(ro, r_kept, w_star, w_phi if net is not None else None, loss,
                                                 grad_norm, c))
            metrics.update(meter.pop())
            metrics["time/iteration"] = time.perf_counter() - tic
            metrics["train/kept_valid"] = ok.float().mean().item()
            metrics["train/degenerate"] = (~valid).float().mean().item()
            budget.seconds += metrics["time/iteration"]
            metrics["train/processes"] = dist.world
            metrics["train/replay_rows"] = len(real) - len(batch)
            if dist.main:
                ctx.record(logger, metrics, step, every=t.log_every)
                if t.table_every and step % t.table_every == 0:
                    ctx.sample_table(logger, step, texts, w_tilde, ro)
            if (t.save_every and step % t.save_every == 0) or step == t.iterations:
                dist.check_same(list(params.values()) + (list(net.parameters()) if net is not None else []))
                opt_state = optimizer.state_dict()  # a collective under DeepSpeed (shards gathered on rank 0)
                rank_rng = dist.gather(rng_state())  # each rank samples from its own stream
                if dist.main:
                    save_checkpoint(run_dir, step, params, net, {
                        "optimizer": opt_state, "order": order.state, "replay_order": replay_order.state,
                        "net_optimizer": net_opt.state_dict() if net_opt is not None else None,
                        "numpy_draws": rng.bit_generator.state, "budget": budget.as_dict()},
                        keep=t.keep_checkpoints, rng=rank_rng)
                dist.barrier()
            if t.eval_every and step % t.eval_every == 0 and step < t.iterations:
                if dist.main:
                    ctx.periodic_eval(logger, model, condition, data.test, reward_set, normalizer, step)
                dist.barrier()
        summary = {"run_dir": run_dir, "iterations": t.iterations, **ctx.last}
        if t.final_eval:
            if dist.main:
                summary.update(ctx.final_eval(logger, model, condition, data.test, reward_set, normalizer,
                                              t.iterations))
            dist.barrier()
        exit_code = 0
        return summary
    finally:
        logger.finish(exit_code)
        if settings.sampler is not None:
            settings.sampler.close()  # the vLLM backend's adapter folder


def meta_step(cfg, model, params, net, net_opt, emb, w_star, kept_src, r_kept, ok, batch, ro, valid, texts,
              condition, device, meter, dist: Dist | None = None) -> dict[str, float]:
    """Steps 6-9: virtual step on the inner half, meta loss on the meta half, Adam step of the net.

    The batch's prompts are split in two: the first half is the inner batch (its kept responses
    and their labels), the second the meta batch (its best response under the target w*, or all
    its samples weighted by advantage).
    """
    m, t = cfg.method, cfg.trainer
    b = len(texts)
    half = b // 2
    inner_rows = (kept_src < half).nonzero().flatten()
    inner = batch.slice(inner_rows).to(device)

    def c_fn() -> torch.Tensor:  # c_i(phi) for the inner examples, graph to phi
        return sample_weights(net(emb, w_star)[kept_src[inner_rows]], r_kept[inner_rows], m.lam,
                              ok[inner_rows]).to(device)

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
    prompts = condition([texts[i] for i in meta_idx for _ in range(len(prefs) // len(meta_idx))], prefs)
    meta_batch = build_batch(condition.tokenizer, prompts, resp, done, t.max_prompt_tokens, prefs=prefs).to(device)
    weights = weights.to(device)

    def meta_loss_fn(p) -> torch.Tensor:
        return (weights * per_example_nll(model, meta_batch, p)).sum()

    net_opt.zero_grad(set_to_none=True)
    kernel = contextlib.nullcontext()
    if m.engine == "autograd" or m.directional_mode == "jvp":
        # double backward and forward-mode AD are implemented by the math SDPA kernel only
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = sdpa_kernel(SDPBackend.MATH)
    with kernel:
        res = meta_gradient(model, params, inner, c_fn, meta_loss_fn, m.alpha_in, list(net.parameters()), m.engine,
                            m.directional_mode, m.fd_eps, m.first_order, t.micro_batch_size, meter)
    if dist is not None:  # the meta-gradient, averaged over data-parallel ranks
        dist.average_grads(net.parameters())
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in net.parameters() if p.grad is not None)).item()
    net_opt.step()
    return {"meta/loss": res.meta_loss, "meta/grad_norm": grad_norm}
