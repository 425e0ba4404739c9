"""The ``method`` node's typed schemas, one per recipe of :mod:`meal.methods`, and each one's own
validation (values a type cannot express, and settings elsewhere in the config that the method
contradicts). :func:`meal.config.typed_method` types a node by its ``recipe``;
:func:`meal.config.validate` calls :func:`validate_method`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

from meal import config as _config
from meal.config import PolicyConfig, _f


def _need(cond: bool, field_name: str, msg: str) -> None:
    _config._need(cond, field_name, msg)  # the one place that raises ConfigError, looked up at call time


@dataclass
class WeightNetConfig:
    """The preference-weight-net (meta-learner), method.md steps 2, 5 and 9."""

    hidden: int = _f(128, "Hidden units of each head's one-hidden-layer MLP.")
    embedding: str = _f("policy", "policy (mean-pooled last hidden state of the frozen base policy) | minilm.")
    features: int = _f(32, "Principal directions of the centred prompt embeddings the net sees, whitened (PCA fitted "
                       "on the training prompts before training; 0: all).")
    lr: float = _f(1e-3, "Adam learning rate beta of the outer update (step 9).")
    adam_eps: float = _f(1e-16, "Adam's eps, far below the meta-gradient's scale (1e-10 and less): the outer update is "
                         "scale-free, so the size of the hypergradient (alpha_in, (1 - lam) factors) does not "
                         "decide whether the net moves.")


@dataclass
class MethodConfig:
    """Meal and its static special case (lam = 1): the recipe meal/methods/meal.py."""

    recipe: str = _f("meal", "Which recipe of meal/methods trains the run (meal: Meal and static).")
    name: str = _f("meal", "Label of the method in run names and comparisons.")
    meta_learner: bool = _f(True, "Build the preference-weight-net (False: the static method, no net at all).")
    lam: float = _f(0.5, "lambda: mix of target and net preference (1 = static rejection sampling).")
    tau: float = _f(1.0, "Temperature of the achieved preference softmax(R / tau) (step 5).")
    label_path: bool = _f(True, "phi reaches the inner loss through the label each kept response is trained under "
                          "(needs preference-aware LoRA; with the preference in the prompt only it carries nothing).")
    weight_path: bool = _f(False, "phi reaches the inner loss through the sample weight c_i = lam + (1 - lam) "
                           "w_phi . sigmoid(R_i) / mean (the earlier Meal's only path).")
    control: str = _f("none", "A control that isolates the net: none | frozen (the net at its initialisation, never "
                      "updated) | uniform (w_phi = the uniform preference, labels the fixed hindsight rule, no net) | "
                      "shuffled (the net learns; the policy sees its outputs permuted across the batch's prompts).")
    alpha_in: Optional[float] = _f(None, "Step size of the one-step virtual update (step 7); None: the real step's "
                                   "trainer.lr.")
    precondition: str = _f("adam", "P of the virtual step: adam (AdamW's current 1 / (sqrt(v^) + eps), detached, as "
                           "the real step) | none (plain SGD, as Meta-Weight-Net).")
    engine: str = _f("directional", "Meta-gradient engine: directional | autograd (same answer, see BENCHMARKS.md).")
    directional_mode: str = _f("per_example", "How the directional engine gets grad l_i . P v: per_example "
                               "(kept gradients) | jvp (forward mode) | fd (central difference).")
    fd_eps: float = _f(3e-2, "Finite-difference step, relative to the norm of the parameters along P v.")
    meta_objective: str = _f("best", "best (NLL of the best-of-N under the target) | advantage.")
    meta_interval: int = _f(1, "Run the meta step (7-9) every this many iterations.")
    meta_updates: int = _f(1, "Repeat steps 7-9 this many times on the same sampled batch (no extra generation).")
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


def method_schemas() -> dict[str, type]:
    """recipe -> the dataclass its ``method`` config follows."""
    return {"meal": MethodConfig, "ric": RicConfig, "morlhf": MorlhfConfig, "soups": SoupsConfig,
            "metaaligner": MetaAlignerConfig}


def validate_method(method, cfg) -> None:
    """The checks of ``method``'s recipe; ConfigError naming the field."""
    {"meal": _validate_meal, "ric": _validate_ric, "morlhf": _validate_morlhf,
     "soups": _validate_soups, "metaaligner": _validate_metaaligner}[method.recipe](method, cfg)


def _validate_meal(tr, cfg) -> None:
    t = cfg.trainer
    _need(0.0 <= tr.lam <= 1.0, "method.lam", f"lambda must be in [0, 1], got {tr.lam}")
    _need(tr.tau > 0, "method.tau", f"must be > 0, got {tr.tau}")
    _need(tr.alpha_in is None or tr.alpha_in > 0, "method.alpha_in", f"must be > 0, got {tr.alpha_in}")
    _need(tr.precondition in ("adam", "none"), "method.precondition", f"adam | none, got {tr.precondition!r}")
    _need(tr.control in ("none", "frozen", "uniform", "shuffled"), "method.control",
          f"none | frozen | uniform | shuffled, got {tr.control!r}")
    _need(tr.engine in ("directional", "autograd"), "method.engine", f"directional | autograd, got {tr.engine!r}")
    _need(tr.directional_mode in ("fd", "jvp", "per_example"), "method.directional_mode",
          f"fd | jvp | per_example, got {tr.directional_mode!r}")
    _need(tr.meta_objective in ("best", "advantage"), "method.meta_objective",
          f"best | advantage, got {tr.meta_objective!r}")
    _need(tr.meta_interval >= 1, "method.meta_interval", f"must be >= 1, got {tr.meta_interval}")
    _need(tr.meta_updates >= 1, "method.meta_updates", f"must be >= 1, got {tr.meta_updates}")
    _need(tr.weight_net.embedding in ("policy", "minilm"), "method.weight_net.embedding",
          f"policy | minilm, got {tr.weight_net.embedding!r}")
    _need(tr.weight_net.features >= 0, "method.weight_net.features", f"must be >= 0, got {tr.weight_net.features}")
    _need(tr.weight_net.adam_eps > 0, "method.weight_net.adam_eps", f"must be > 0, got {tr.weight_net.adam_eps}")
    if not tr.meta_learner:
        _need(tr.lam == 1, "method.lam", f"lambda = {tr.lam} needs the preference-weight-net (method=meal); the static "
              f"method is lambda = 1 (the net's controls: method.control=frozen | uniform | shuffled)")
        return
    _need(tr.lam < 1, "method.lam", "with lambda = 1 the preference-weight-net never receives a gradient (every "
          "sample weight is 1): that is the static method, method=static")
    if tr.control in ("frozen", "uniform"):
        return  # nothing learns: no gradient path is needed
    label = tr.label_path and cfg.policy.lora.preference_aware
    _need(label or tr.weight_path, "method.label_path", "no path carries the meta-gradient: the label path needs "
          "preference-aware LoRA (policy.lora.preference_aware=true; with the preference in the prompt only, a label "
          "is text), else turn on method.weight_path=true")
    if tr.weight_path and not label:
        # the sample weights are normalised to mean 1 over the inner half of the batch: with one inner
        # example they are constant in phi and the meta-gradient is exactly 0
        inner = (t.batch_size // 2) * t.top_m
        _need(inner >= 2, "trainer.batch_size", f"Meal splits each batch into an inner and a meta half; the inner "
              f"half holds batch_size // 2 * top_m = {inner} kept response(s), and weights normalised over fewer "
              f"than 2 give the net no gradient: needs batch_size >= 4 (or top_m >= 2)")


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
