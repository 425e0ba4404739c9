"""Opening a run, shared by every method: :func:`start_run` reads the config once
(:func:`meal.harness.settings.read_run_spec`), runs the checks that come before any model is loaded
(:mod:`meal.harness.preflight`: resume or new run, data, rewards, the policy's source) and hands the recipe a
:class:`Run`: data, rewards, the policy (conditioned by step 0, or restored from the checkpoint), the reward
normalisation, the logger, the prompt order and draws, the online budget; :meth:`Run.save` writes a
checkpoint (a collective under data parallelism) and :meth:`Run.evaluate` the front of any responder.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Union

import numpy as np
import torch
from omegaconf import DictConfig

from meal.config import ConfigError
from meal.harness.budget import Budget
from meal.harness.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from meal.harness.preflight import (build_rewards, check_policy_source, load_task_data, log_cut_prompts, resume_point,
                                    write_run_config)
from meal.rewards import RewardNormalizer
from meal.tasks import TaskData

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from meal.harness.conditioning import ConditionedStart
    from meal.harness.distributed import AdamWStep, DeepSpeedStep, Dist
    from meal.harness.report import Report
    from meal.harness.settings import RunSpec
    from meal.harness.tracking import NullLogger
    from meal.policy.rollout import Conditioner, PromptOrder, Scoring
    from meal.policy.sampling import GenerationSettings

    PolicyOptimizer = Union[AdamWStep, DeepSpeedStep]

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class PolicyParts:
    """What the recipe trains: ``model`` (its trainable tensors ``params``, by name), ``tokenizer``, how a
    preference is written into a prompt (``condition``), how it samples (``settings``: the training
    rollouts' sampling, with the vLLM sampler when ``generation.backend=vllm``) and, where the recipe asked
    for them, the policy's step-10 engine (``optimizer``: AdamW, or DeepSpeed ZeRO under a DeepSpeed launch)
    and the frozen embeddings of the training prompts (``embeddings``, (M, D))."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    params: dict[str, torch.Tensor]
    condition: Conditioner
    settings: GenerationSettings
    optimizer: PolicyOptimizer | None = None
    embeddings: torch.Tensor | None = None


@dataclass(kw_only=True)
class Progress:
    """Where the run stands: the prompt order (``order``) and the numpy draws (``draws``: preferences), the
    online stage's cost so far (``budget``), the iteration to start at (``start``); when the run resumes,
    the checkpoint folder (``checkpoint``) and its saved state (``state``: the policy's weights are already
    restored, the random streams continue when :meth:`Run.iterations` starts; the recipe restores what it
    owns, e.g. its optimiser), else None."""

    order: PromptOrder
    draws: np.random.Generator
    budget: Budget
    start: int = 0
    checkpoint: str | None = None
    state: dict | None = None


@dataclass(kw_only=True)
class Run:
    """An opened run, as every method's recipe starts it (:func:`start_run`), built by keyword from a few
    typed parts: what the harness read of the config (``spec``, :func:`meal.harness.settings.read_run_spec`),
    the processes (``dist``), the run folder, the task's data and objectives, what responses are scored by
    (``scoring``: rewards and normalisation), the policy (:class:`PolicyParts`), where the run stands
    (:class:`Progress`), the conditioning stage's record (``conditioning``, None without one), and what
    it shows (``report``, ``logger``)."""

    spec: RunSpec
    dist: Dist
    run_dir: str
    data: TaskData
    objectives: list[str]
    scoring: Scoring
    policy: PolicyParts
    progress: Progress
    conditioning: ConditionedStart | None
    report: Report
    logger: NullLogger  # or a subclass (WandbLogger)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, kind, err, tb) -> None:
        """Close what the run opened, however the recipe ends (success, error, interrupt): the logger, with
        exit code 0 or 1, and the vLLM sampler (its adapter folder)."""
        try:
            self.logger.finish(0 if kind is None else 1)
        finally:
            if self.policy.settings.sampler is not None:
                self.policy.settings.sampler.close()

    @property
    def train_texts(self) -> list[str]:
        return [e.text for e in self.data.train]

    def iterations(self, total: int | None = None):
        """The iterations left of ``total`` (default ``trainer.iterations``), under a progress bar. A resumed
        run's random streams continue from the checkpoint here, after the recipe's own set-up (which may
        draw from them)."""
        if self.progress.state is not None:
            saved = self.progress.state["rng"]
            set_rng_state(saved[self.dist.rank if self.dist.rank < len(saved) else 0])
        return self.report.progress(self.progress.start, total or self.spec.cadence.iterations, show=self.dist.main)

    def save(self, step: int, optimizer, net: torch.nn.Module | None = None, **state: Any) -> None:
        """Checkpoint ``step``: the policy's trainable weights (and ``net``), the optimiser, prompt order,
        draws, budget, every rank's random state and the recipe's own ``state``. A collective."""
        dist = self.dist
        dist.check_same(list(self.policy.params.values()) + (list(net.parameters()) if net is not None else []))
        opt_state = optimizer.state_dict()  # a collective under DeepSpeed (shards gathered on rank 0)
        rank_rng = dist.gather(rng_state())  # each rank samples from its own stream
        if dist.main:
            p = self.progress
            save_checkpoint(self.run_dir, step, self.policy.params, net, {
                "optimizer": opt_state, "order": p.order.state, "numpy_draws": p.draws.bit_generator.state,
                "budget": p.budget.as_dict(), **state}, keep=self.spec.cadence.keep_checkpoints, rng=rank_rng)
        dist.barrier()

    def end_iteration(self, step: int, total: int, metrics: dict[str, float], optimizer, *, responder=None,
                      table: tuple | None = None, net: torch.nn.Module | None = None, **state: Any) -> None:
        """The close of iteration ``step`` of ``total`` shared by the recipes: a non-finite loss
        (``metrics["train/loss"]``) stops the run before anything is saved (the last checkpoint stays
        intact); the iteration's seconds (``metrics["time/iteration"]``) into the budget; the metrics
        logged, with a sample table every ``trainer.table_every`` from ``table`` = (texts, preferences,
        rollout); a checkpoint (with ``net`` and the recipe's ``state``) every ``trainer.save_every`` and at
        the last step; the periodic evaluation of ``responder`` every ``trainer.eval_every`` and at the last
        step (a learning curve on the validation prompts)."""
        t, loss = self.spec.cadence, metrics["train/loss"]
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step}: the training loss is {loss}; the last checkpoint in "
                                     f"{self.run_dir}/checkpoints is intact")
        self.progress.budget.seconds += metrics["time/iteration"]
        if self.dist.main:
            self.report.record(self.logger, metrics, step, every=t.log_every)
            if table is not None and t.table_every and step % t.table_every == 0:
                self.report.sample_table(self.logger, step, *table)
        if (t.save_every and step % t.save_every == 0) or step == total:
            self.save(step, optimizer, net, **state)
        if responder is not None and t.eval_every and (step % t.eval_every == 0 or step == total):
            self.periodic_eval(responder, step)  # the learning curve, on the validation prompts, its last point too

    def net_state(self) -> dict[str, torch.Tensor] | None:
        """The recipe's net as the checkpoint the run resumes from saved it (None for a new run)."""
        if self.progress.checkpoint is None:
            return None
        from safetensors.torch import load_file

        return load_file(os.path.join(self.progress.checkpoint, "net.safetensors"))

    def load_net(self, net: torch.nn.Module) -> None:
        """The recipe's net from the checkpoint the run resumes from (no-op for a new run)."""
        state = self.net_state()
        if state is not None:
            net.load_state_dict(state)

    def periodic_eval(self, responder, step: int) -> None:
        """The learning curve's point at ``step``: a small grid on the first ``trainer.eval_prompts``
        validation prompts (the test prompts where the task holds none out)."""
        if self.dist.main:
            prompts = self.data.validation or self.data.test
            self.report.periodic_eval(self.logger, responder, prompts, self.scoring.reward_set,
                                      self.scoring.normalizer, step)
        self.dist.barrier()

    def evaluate(self, responder) -> dict[str, Any]:
        """The final evaluation (main process) on ``trainer.final_eval_split``: the full grid (or the
        responder's own ``grid``), front.json and front.png; the summary."""
        out: dict[str, Any] = {}
        if self.dist.main:
            split = self.spec.cadence.final_eval_split
            out = self.report.final_eval(self.logger, responder, self.data.split(split), self.scoring.reward_set,
                                         self.scoring.normalizer, self.spec.cadence.iterations, split=split)
        self.dist.barrier()
        return out


def start_run(cfg: DictConfig, condition_factory: Callable | None = None, embed: str | None = None,
              optimizer: bool = True) -> Run:
    """Open a run for a recipe: checks, data, rewards, policy, step 0 (or the checkpoint), normalisation,
    logger; the :class:`Run` closes what it opened when the recipe's ``with`` block ends. The config is
    read here, once (:func:`meal.harness.settings.read_run_spec`); nothing below takes it.
    ``condition_factory(template, objectives, tokenizer)`` builds how preferences are written into prompts
    (default: :class:`~meal.policy.rollout.Conditioner`, the step-4 template). ``embed`` (policy | minilm): also the
    frozen embeddings of the training prompts (``run.policy.embeddings``, (M, D)), taken from the policy as loaded,
    before step 0 or a checkpoint changes its weights. ``optimizer``: build the policy's step-10 engine
    (``run.policy.optimizer``); a recipe that trains with another trainer (TRL's) or another model asks for none."""
    from meal.harness.settings import read_run_spec

    return open_run(read_run_spec(cfg), condition_factory, embed, optimizer)


def open_run(spec: RunSpec, condition_factory: Callable | None = None, embed: str | None = None,
             optimizer: bool = True) -> Run:
    """:func:`start_run` from the run's settings."""
    from meal.harness.conditioning import (StagePolicy, condition_policy, conditioning_budget, read_conditioning,
                                           record_conditioning)
    from meal.harness.distributed import Dist, deepspeed_config, make_policy_optimizer
    from meal.harness.report import Report, seed_everything
    from meal.harness.settings import training_sampler
    from meal.harness.tracking import NullLogger, open_logger
    from meal.policy.model import load_policy, resolve_device, resolve_dtype, trainable_parameters
    from meal.policy.rollout import ConditionedPolicy, Conditioner, PromptOrder, Scoring, reward_statistics

    t, task, policy_cfg = spec.trainer, spec.task, spec.policy
    dist = Dist()
    if spec.batch_size % dist.world:
        raise ConfigError(f"trainer.batch_size: {spec.batch_size} does not split over {dist.world} processes")
    if t.replay % dist.world:
        raise ConfigError(f"trainer.replay: {t.replay} rows do not split over {dist.world} processes")
    run_dir = spec.run_dir
    ckpt = resume_point(run_dir, spec.resume, spec.resolved)  # a new run, or the checkpoint to resume
    check_policy_source(policy_cfg)
    device_name = str(dist.device) if dist.device is not None and policy_cfg.device == "auto" else policy_cfg.device
    ds_config = deepspeed_config(t, dist, resolve_dtype(policy_cfg.dtype, resolve_device(device_name)),
                                 spec.replay_rows)
    seed_everything(spec.seed + dist.rank)  # sampling differs per rank; prompt order and w* draws do not
    data = load_task_data(task)
    objectives = list(task.objectives)
    reward_set = build_rewards(spec.rewards, objectives)  # each reward tried on dummy responses before the policy
    if dist.main and ckpt is None:
        write_run_config(run_dir, spec.config_yaml)
    model, tok = load_policy(policy_cfg, len(objectives), device=device_name)
    params = trainable_parameters(model)
    dist.broadcast(params.values())  # one starting point: LoRA's random init drew from each rank's own seed
    condition = (condition_factory or Conditioner)(task.template, objectives, tok)
    settings = replace(spec.generation, sampler=training_sampler(spec.vllm, dist.rank, dist.world))
    train_texts = [e.text for e in data.train]
    if dist.main:
        log_cut_prompts(condition, train_texts + [e.text for e in data.test + data.validation], len(objectives),
                        tok, spec.max_prompt_tokens)
    embeddings = None
    if embed is not None:
        from meal.policy.embeddings import embed_prompts

        embeddings = embed_prompts(embed, model, tok, train_texts)
    conditioning = None
    if ckpt is None and spec.stage is not None:
        # 0. the conditioning stage (cached, shared by every run of the task): the policy learns to
        #    follow its preference; the statistics of its scored corpus become the run's. It runs
        #    before any optimiser is built, whose own copy of the weights (DeepSpeed's fp32 master)
        #    must start from the conditioned ones
        stage = StagePolicy(model, params, condition, settings)
        conditioning = condition_policy(spec.stage, data, stage, reward_set, run_dir,
                                        lambda folder: open_logger(spec.logger, folder, False, stage=True), dist)
    # the policy's optimiser (step 10's engine; a collective under DeepSpeed), built before any sampling
    # as a DeepSpeed launch needs it
    policy_optimizer = make_policy_optimizer(model, params, t, dist, ds_config) if optimizer else None
    report = Report(run_dir, spec.report, objectives)
    order = PromptOrder(len(train_texts), spec.seed)
    draws = np.random.default_rng(spec.seed)
    stats_path = os.path.join(run_dir, "reward_stats.json")
    state, start, budget = None, 0, Budget()  # the online stage's cost (the conditioning stage's is apart)
    if ckpt is not None:
        state = load_checkpoint(ckpt, params, None, rank=dist.rank, trust=spec.resume.trust_run)
        if dist.main:  # the launch is good: now the run's record may say so
            write_run_config(run_dir, spec.config_yaml)
            dropped = report.jsonl.truncate_after(state["step"])
            if dropped:
                log.info("metrics.jsonl: dropped %d record(s) past the checkpoint's step %d (done again now)",
                         dropped, state["step"])
        if len(state["rng"]) != dist.world:
            log.warning("the checkpoint was written by %d processes, this launch has %d: sampling does not "
                        "continue the saved random streams exactly", len(state["rng"]), dist.world)
        order = PromptOrder(len(train_texts), spec.seed, **state["order"])
        draws.bit_generator.state = state["numpy_draws"]
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
        p = spec.norm_pass
        normalizer = reward_statistics(p, ConditionedPolicy(model, condition), train_texts, settings, reward_set)
        if dist.main:
            normalizer.save(stats_path, {"source": "normalisation pass", "prompts": p.prompts,
                                         "samples_per_prompt": p.draws.samples, "seed": p.draws.seed})
    report.budgets = {"online": budget, "conditioning": conditioning_budget(conditioning)}
    logger = open_logger(spec.logger, run_dir, resume=ckpt is not None) if dist.main else NullLogger()
    return Run(spec=spec, dist=dist, run_dir=run_dir, data=data, objectives=objectives,
               scoring=Scoring(reward_set, normalizer),
               policy=PolicyParts(model=model, tokenizer=tok, params=params, condition=condition, settings=settings,
                                  optimizer=policy_optimizer, embeddings=embeddings),
               progress=Progress(order=order, draws=draws, budget=budget, start=start, checkpoint=ckpt, state=state),
               conditioning=conditioning, report=report, logger=logger)
