"""The edge where a run's config is read: :func:`read_run_spec` turns the composed config into the typed,
plain settings the harness works with (:class:`RunSpec`), once, when :func:`~meal.harness.run.start_run`
opens the run. Below it no harness function takes the config: each takes the part it needs.

The readers that the other edges share (a finished run's config read by ``meal-eval``, ``meal-generate``,
MetaAligner's zero-shot table, the benchmarks) are here too: :func:`generation_settings`,
:func:`eval_texts`, :func:`run_provenance`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from meal.harness.conditioning import StageSettings
from meal.harness.report import ReportSettings, first_prompts
from meal.harness.tracking import LoggerSpec
from meal.policy.rollout import Draws, NormalisationPass, statistics_key
from meal.policy.sampling import GenerationSettings


def eval_texts(cfg: DictConfig, split, prompts: int = 0) -> list[str]:
    """The prompts of a split (test or validation) a front is evaluated on: ``prompts`` of them, else the
    run's ``trainer.final_eval_prompts``, else all; one rule, so that a run's fronts and meal-eval's compare."""
    return first_prompts(split, prompts or cfg.trainer.final_eval_prompts)


def generation_settings(cfg: DictConfig, eval_protocol: bool = False) -> GenerationSettings:
    """Sampling settings of the run; ``eval_protocol`` fixes top_p 0.9, top_k 0, temperature 1 and draws
    each response with its own seed (``seeding="row"``: a front does not depend on the batch size)."""
    t = cfg.trainer
    if eval_protocol:
        return GenerationSettings(cfg.task.max_new_tokens, 0.9, 0, 1.0, t.gen_batch_size, t.max_prompt_tokens,
                                  seeding="row")
    return GenerationSettings(cfg.task.max_new_tokens, t.top_p, t.top_k, t.temperature, t.gen_batch_size,
                              t.max_prompt_tokens)


def run_provenance(cfg: DictConfig) -> dict[str, Any]:
    """What every front records of the run that made it: its method, training seed and task."""
    return {"method": cfg.method.name, "train_seed": cfg.trainer.seed, "task": cfg.task.name}


@dataclass(frozen=True)
class VllmSpec:
    """The vLLM engine of training rollouts (``generation.backend=vllm``); each process starts its own
    (:func:`training_sampler`), seeded ``seed + rank``."""

    source: str
    max_lora_rank: int
    gpu_memory_utilization: float
    max_model_len: int | None
    seed: int


def training_sampler(spec: VllmSpec | None, rank: int = 0, world: int = 1):
    """The sampler of training rollouts: None (Hugging Face generate) or a vLLM sampler.

    Under data parallelism every rank runs its own vLLM engine on its own GPU, started by the
    same launcher (vLLM's ``external_launcher`` executor) and seeded per rank.
    """
    if spec is None:
        return None
    from meal.policy.vllm_backend import VLLMSampler

    return VLLMSampler(spec.source, max_lora_rank=spec.max_lora_rank,
                       gpu_memory_utilization=spec.gpu_memory_utilization, max_model_len=spec.max_model_len,
                       seed=spec.seed + rank, external_launcher=world > 1)


@dataclass(frozen=True)
class Cadence:
    """How often the run logs, checkpoints and evaluates (``trainer.*``), and how long it runs."""

    iterations: int
    log_every: int
    table_every: int
    save_every: int
    keep_checkpoints: int
    eval_every: int
    final_eval_split: str


@dataclass(frozen=True)
class ResumeSpec:
    """Whether the launch resumes (``trainer.resume``), from which checkpoint (``trainer.resume_from``,
    None: the newest intact one), and whether its pickled state may be trusted (``trainer.trust_run``)."""

    resume: bool
    resume_from: str | None
    trust_run: bool


@dataclass(frozen=True)
class RunSpec:
    """Everything the harness reads of a run's config, read once (:func:`read_run_spec`).

    ``resolved`` is the launch's config as a plain dict (what a resume compares with ``config.yaml``);
    ``config_yaml`` is ``config.yaml`` as written. The nodes ``task`` and ``policy`` travel as the typed
    config parts they are (:class:`meal.config.TaskConfig`, :class:`meal.config.PolicyConfig`), ``trainer``
    to the policy's optimiser (:func:`meal.harness.distributed.make_policy_optimizer`)."""

    run_dir: str
    resolved: dict
    config_yaml: str
    seed: int
    batch_size: int
    replay_rows: int  # rows of the conditioning stage every real step adds (0 without the stage)
    max_prompt_tokens: int
    task: Any  # the ``task`` node
    policy: Any  # the ``policy`` node
    trainer: Any  # the ``trainer`` node
    rewards: dict
    resume: ResumeSpec
    cadence: Cadence
    generation: GenerationSettings
    vllm: VllmSpec | None
    report: ReportSettings
    stage: StageSettings | None
    norm_pass: NormalisationPass
    logger: LoggerSpec


def read_run_spec(cfg: DictConfig) -> RunSpec:
    """The run's config read once, at the edge, into the settings the harness works with."""
    from meal.policy.model import resolve_source

    t, task, g = cfg.trainer, cfg.task, cfg.generation
    resolved = OmegaConf.to_container(cfg, resolve=True)
    name = cfg.logger.name or f"{task.name}-{cfg.method.name}-s{t.seed}"
    stage = None
    if cfg.conditioning.enabled:
        stage = StageSettings(cfg.conditioning, task.name, list(task.pool_instructions), t.dirichlet_alpha,
                              t.max_prompt_tokens, t.weight_decay, t.max_grad_norm, resolved)
    vllm = None
    if g.backend == "vllm":
        vllm = VllmSpec(resolve_source(cfg.policy), cfg.policy.lora.r, g.vllm_gpu_memory_utilization,
                        g.vllm_max_model_len, t.seed)
    return RunSpec(
        run_dir=t.out_dir, resolved=resolved, config_yaml=OmegaConf.to_yaml(cfg), seed=t.seed,
        batch_size=t.batch_size, replay_rows=t.replay if cfg.conditioning.enabled else 0,
        max_prompt_tokens=t.max_prompt_tokens, task=task, policy=cfg.policy, trainer=t,
        rewards=copy.deepcopy(resolved["rewards"]),
        resume=ResumeSpec(t.resume, t.resume_from, t.trust_run),
        cadence=Cadence(t.iterations, t.log_every, t.table_every, t.save_every, t.keep_checkpoints, t.eval_every,
                        t.final_eval_split),
        generation=generation_settings(cfg), vllm=vllm,
        report=ReportSettings(name, cfg.method.name, list(task.hv_ref), t.eval_prompts, t.final_eval_prompts,
                              generation_settings(cfg, eval_protocol=True), run_provenance(cfg)),
        stage=stage,
        norm_pass=NormalisationPass(t.norm_prompts, Draws(t.norm_samples, t.dirichlet_alpha, t.norm_seed),
                                    t.stats_cache, statistics_key(resolved)),
        logger=LoggerSpec(resolved["logger"], resolved, name, f"{task.name}-conditioning"))
