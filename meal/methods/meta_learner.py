"""Meal's meta-learner as one named operation: propose, label, weight, step (method.md steps 2-3, 5-9).

A learner answers four questions of an iteration of :mod:`meal.methods.meal`:

- ``propose(idx, w*)``: the preference w_phi the policy samples under is mixed from (step 2-3);
- ``labels(idx, w*, kept)``: the preference w^lab each kept response is trained under (step 5);
- ``weights(idx, w*, kept)``: each kept response's sample weight c (step 6);
- ``step(batch)``: the outer update of the net on one iteration's samples (steps 7-9).

:class:`FixedLearner` learns nothing: with lam = 1 it is the static method (w~ = w*, labels w*,
weights 1), with lam < 1 and ``proposal="uniform"`` the control in which w_phi is the uniform
preference and the label the fixed hindsight rule. :class:`NetLearner` is Meal: the
preference-weight-net over whitened prompt features, with the controls ``frozen`` (never updated:
exactly its initialisation, i.e. w_phi = w*, h = w^) and ``shuffled`` (it learns, but the policy
sees its learned residuals permuted across the batch's prompts).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from meal.methods.bilevel import (InnerLoss, MetaGradientStats, MetaGradSettings, PreferenceWeightNet, PromptFeatures,
                                  SumFn, achieved_preference, adam_preconditioner, dynamic_preference, label_preference,
                                  masked_ones, meta_gradient, sample_weights)
from meal.policy.losses import SFTBatch, build_batch, per_example_nll
from meal.policy.sampling import scalarise, select_valid_best


@dataclass
class Kept:
    """What step 4 kept for one iteration: per kept response its prompt's position in the batch (B*m,),
    its normalised rewards (B*m, K), whether it is valid (B*m,) and its sample (B*m,) among the N."""

    src: torch.Tensor
    rewards: torch.Tensor
    ok: torch.Tensor
    sample: torch.Tensor


@dataclass
class MetaSettings:
    """The meta-learner's settings, read from ``cfg.method`` at the edge (help: meal.methods.meal.MethodConfig)."""

    lam: float
    tau: float
    alpha_in: float
    precondition: str = "adam"  # adam | none
    engine: str = "directional"
    mode: str = "per_example"
    fd_eps: float = 3e-2
    first_order: bool = False
    meta_objective: str = "best"
    label_path: bool = True
    weight_path: bool = False
    control: str = "none"  # none | frozen | shuffled (NetLearner); uniform (FixedLearner)
    micro_batch_size: int | None = None
    seed: int = 0


@dataclass
class IterationBatch:
    """One iteration's samples as the meta step needs them: the batch's prompts (B,) with their positions
    ``idx`` in the training set, targets w* (B, K), what was kept, and the rollout's texts, finished
    flags, normalised rewards (B, N, K) and validity (B, N)."""

    idx: list[int]
    texts: list[str]
    w_star: torch.Tensor
    kept: Kept
    responses: list[list[str]]
    finished: list[list[bool]]
    rewards: torch.Tensor
    valid: torch.Tensor


@dataclass
class PolicyHandle:
    """What the meta step reads of the policy: the model, its trainable parameters, its tokenizer, how
    prompts are written (``condition(texts, prefs)``), its optimiser (for the preconditioner) and the
    prompt budget."""

    model: Any
    params: dict[str, torch.Tensor]
    tokenizer: Any
    condition: Any
    optimizer: Any
    max_prompt_tokens: int


class FixedLearner:
    """No learning: w_phi is the target w* (static, lam = 1) or the uniform preference (control
    ``uniform``), labels mix w~ with the fixed hindsight rule softmax(R / tau), weights are 1 (or the
    weight path's c with the fixed w_phi)."""

    learns = False

    def __init__(self, settings: MetaSettings, num_objectives: int, proposal: str = "target"):
        self.s, self.k, self.proposal = settings, num_objectives, proposal

    def propose(self, idx: Sequence[int], w_star: torch.Tensor) -> torch.Tensor:
        return torch.full_like(w_star, 1.0 / self.k) if self.proposal == "uniform" else w_star

    def labels(self, idx: Sequence[int], w_star: torch.Tensor, kept: Kept) -> torch.Tensor:
        w_tilde = dynamic_preference(w_star, self.propose(idx, w_star), self.s.lam)
        return label_preference(w_tilde[kept.src], achieved_preference(kept.rewards, self.s.tau), self.s.lam)

    def weights(self, idx: Sequence[int], w_star: torch.Tensor, kept: Kept, total: SumFn | None = None
                ) -> torch.Tensor:
        if self.s.weight_path and self.s.lam < 1:
            return sample_weights(self.propose(idx, w_star)[kept.src], kept.rewards, self.s.lam, kept.ok, total)
        return masked_ones(kept.ok, total=total)

    def begin(self, iteration: int, batch_size: int) -> None:
        pass

    def step(self, it: IterationBatch, policy: PolicyHandle, dist, meter) -> dict[str, float]:
        return {}

    def diagnostics(self, w_star: torch.Tensor | None = None) -> dict[str, float]:
        return {}


DIAGNOSTIC_KEYS = tuple(["meta/param_distance", "meta/param_distance_rel"]
                       + [f"meta/{n}_{m}" for n in ("w_phi", "h_phi") for m in ("spread_std", "spread_range", "shift")])
"""What :meth:`NetLearner.diagnostics` returns: the net's state, recorded with every front of a Meal run."""


class NetLearner:
    """Meal's preference-weight-net (method.md steps 2, 5-9) over the frozen prompt features ``z`` (M, d)
    of the training prompts; its Adam optimiser (step 9) with an eps far below the meta-gradient's
    scale, so that the update is scale-free. ``control``: none | frozen | shuffled."""

    learns = True

    def __init__(self, net: PreferenceWeightNet, features: torch.Tensor, settings: MetaSettings, lr: float,
                 adam_eps: float = 1e-16):
        self.net, self.z, self.s = net, features, settings
        self.optimizer = torch.optim.Adam(net.parameters(), lr=lr, eps=adam_eps)
        self.initial = [p.detach().clone() for p in net.parameters()]
        self.stats = MetaGradientStats()
        self.perm: torch.Tensor | None = None
        self.learns = settings.control != "frozen"

    # what the policy sees (detached; the shuffled control permutes the net's residuals over the batch)

    def begin(self, iteration: int, batch_size: int) -> None:
        """A new iteration: the shuffled control draws its permutation of the batch's prompts."""
        if self.s.control == "shuffled":
            self.perm = torch.as_tensor(np.random.default_rng([self.s.seed, iteration]).permutation(batch_size))

    @torch.no_grad()
    def propose(self, idx: Sequence[int], w_star: torch.Tensor) -> torch.Tensor:
        z = self.z[list(idx)]
        logits = self.net.proposal_logits(z, w_star)
        if self.perm is not None:
            logits = logits[self.perm]
        return self.net.propose(z, w_star, logits).float()

    @torch.no_grad()
    def labels(self, idx: Sequence[int], w_star: torch.Tensor, kept: Kept) -> torch.Tensor:
        z, src = self.z[list(idx)], kept.src
        w_tilde = dynamic_preference(w_star, self.propose(idx, w_star), self.s.lam)
        logits = self.net.relabel_logits(z[src], w_star[src], kept.rewards)
        if self.perm is not None:  # each kept response takes the residual of the response of the permuted prompt
            logits = logits[_rows_of(self.perm, src)]
        h = self.net.relabel(z[src], w_star[src], kept.rewards, logits)
        return label_preference(w_tilde[src], h, self.s.lam).float()

    @torch.no_grad()
    def weights(self, idx: Sequence[int], w_star: torch.Tensor, kept: Kept, total: SumFn | None = None
                ) -> torch.Tensor:
        """Step 10's c (detached), normalised over the whole batch (``total``: the sum over data-parallel
        processes; None: one process)."""
        if not self.s.weight_path:
            return masked_ones(kept.ok, total=total)
        return sample_weights(self.propose(idx, w_star)[kept.src], kept.rewards, self.s.lam, kept.ok, total).float()

    # the outer update (steps 6-9)

    def step(self, it: IterationBatch, policy: PolicyHandle, dist, meter) -> dict[str, float]:
        """Steps 6-9 on one iteration: the first half of the batch's prompts is the inner batch (its kept
        responses, their labels and weights as functions of phi), the second half the meta batch (its
        best response under the target w*, or all its samples weighted by advantage); the virtual step,
        the meta-gradient, averaged over data-parallel ranks, and Adam's step of the net."""
        if not self.learns:
            return {}
        s, net = self.s, self.net
        device = next(policy.model.parameters()).device
        half = len(it.texts) // 2
        rows = (it.kept.src < half).nonzero().flatten()  # the inner half's kept responses
        kept_in = Kept(it.kept.src[rows], it.kept.rewards[rows], it.kept.ok[rows], it.kept.sample[rows])
        z = self.z[list(it.idx)]
        label_on = s.label_path and getattr(policy.model, "meal_preference", None) is not None

        def net_labels() -> torch.Tensor:  # w^lab(phi) of the inner rows, graph to phi
            w_tilde = dynamic_preference(it.w_star, net.propose(z, it.w_star), s.lam)
            h = net.relabel(z[kept_in.src], it.w_star[kept_in.src], kept_in.rewards)
            return label_preference(w_tilde[kept_in.src], h, s.lam)

        def labels() -> torch.Tensor | None:  # the label path (None: off, the labels are fixed)
            return net_labels() if label_on else None

        total = dist.batch_sum  # normalised over every process's inner half

        def weights() -> torch.Tensor:  # c(phi) of the inner rows (the weight path), else the 0/1 validity
            if not s.weight_path:
                return masked_ones(kept_in.ok, total=total).to(device)
            return sample_weights(net.propose(z, it.w_star)[kept_in.src], kept_in.rewards, s.lam,
                                  kept_in.ok, total).to(device)

        with torch.no_grad():
            lab0 = net_labels().float()
        inner = labelled_batch(policy, it.texts, it.responses, it.finished, kept_in, lab0).to(device)
        meta_batch, meta_w = self._meta_batch(it, half, policy, dist)
        meta_batch, meta_w = meta_batch.to(device), meta_w.to(device)

        def meta_loss(p) -> torch.Tensor:
            return (meta_w * per_example_nll(policy.model, meta_batch, p)).sum()

        precondition = None  # P = the scale AdamW's next step would use with the inner gradient g
        if s.precondition == "adam":
            precondition = functools.partial(adam_preconditioner, policy.optimizer, policy.params)
        settings = MetaGradSettings(s.alpha_in, s.engine, s.mode, s.fd_eps, s.first_order, s.micro_batch_size,
                                    precondition, sum_over_processes=dist.sum_, processes=dist.world)
        self.optimizer.zero_grad(set_to_none=True)
        kernel = contextlib.nullcontext()
        if s.engine == "autograd" or s.mode == "jvp":
            # double backward and forward-mode AD are implemented by the math SDPA kernel only
            from torch.nn.attention import SDPBackend, sdpa_kernel

            kernel = sdpa_kernel(SDPBackend.MATH)
        with kernel:
            res = meta_gradient(policy.model, policy.params, InnerLoss(inner, weights, labels), meta_loss,
                                list(net.parameters()), settings, meter)
        dist.average_grads(net.parameters())  # the meta-gradient: each rank's share of the inner batch, averaged
        out = {"meta/loss": res.meta_loss, **self.stats.update(list(net.parameters()))}
        self.optimizer.step()
        return out

    def _meta_batch(self, it: IterationBatch, half: int, policy: PolicyHandle, dist
                    ) -> tuple[SFTBatch, torch.Tensor]:
        """Step 8's batch on the second half of the prompts, written with the target w*, and its row weights,
        normalised over the whole batch (every process's meta half): the processes' meta losses sum to the
        single process's."""
        meta_idx = list(range(half, len(it.texts)))
        scores = scalarise(it.w_star[meta_idx], it.rewards[meta_idx])  # (B_meta, N) under the target
        if self.s.meta_objective == "best":  # the best valid response under the target (none: weight 0)
            best, good = select_valid_best(scores, it.valid[meta_idx])
            pairs = list(zip(meta_idx, best[:, 0].tolist()))
            good = good[:, 0].float()
            total = good.sum().reshape(1)
            dist.sum_([total])
            prefs, weights = it.w_star[meta_idx], good / total.clamp_min(1.0)
        else:  # advantage: every sample, weighted by its group-normalised target score
            n = scores.shape[1]
            adv = (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True).nan_to_num(1.0).clamp_min(1e-6)
            pairs = [(i, j) for i in meta_idx for j in range(n)]
            prefs, weights = it.w_star[meta_idx].repeat_interleave(n, 0), adv.reshape(-1) / (adv.numel() * dist.world)
        prompts = policy.condition([it.texts[i] for i, _ in pairs], prefs)
        batch = build_batch(policy.tokenizer, prompts, [it.responses[i][j] for i, j in pairs],
                            [it.finished[i][j] for i, j in pairs], policy.max_prompt_tokens, prefs=prefs)
        return batch, weights

    # what the net did (method.md, "The meta-learner must be able to learn")

    @torch.no_grad()
    def diagnostics(self, w_star: torch.Tensor | None = None) -> dict[str, float]:
        """meta/param_distance (and relative to the initial norm); the spread of w_phi and of h_phi over
        every training prompt at one fixed w* (default uniform; h at R = 0), std and max - min per objective."""
        m, k = self.z.shape[0], self.net.proposal[2].out_features
        w = (torch.full((k,), 1.0 / k) if w_star is None else w_star).expand(m, k).to(self.z.dtype)
        dist = torch.sqrt(sum(((p - p0) ** 2).sum() for p, p0 in zip(self.net.parameters(), self.initial)))
        init = torch.sqrt(sum((p0 ** 2).sum() for p0 in self.initial))
        out = {"meta/param_distance": dist.item(), "meta/param_distance_rel": (dist / init.clamp_min(1e-12)).item()}
        w_phi = self.net.propose(self.z, w).float()
        h = self.net.relabel(self.z, w, torch.zeros(m, k)).float()
        for name, x in (("w_phi", w_phi), ("h_phi", h)):
            out[f"meta/{name}_spread_std"] = x.std(0).max().item()
            out[f"meta/{name}_spread_range"] = (x.max(0).values - x.min(0).values).max().item()
            out[f"meta/{name}_shift"] = (x - w).abs().sum(-1).mean().item()
        return out

    def state(self) -> dict:
        return {"net_optimizer": self.optimizer.state_dict()}

    def load(self, state: dict, net_state: dict | None) -> None:
        """Restore the net and its optimiser from a checkpoint (``initial`` stays the seeded initialisation)."""
        if net_state is not None:
            self.net.load_state_dict(net_state)
        self.optimizer.load_state_dict(state["net_optimizer"])


def labelled_batch(policy: PolicyHandle, texts: Sequence[str], responses: Sequence[Sequence[str]],
                   finished: Sequence[Sequence[bool]], kept: Kept, labels: torch.Tensor) -> SFTBatch:
    """The kept responses as an SFT batch, each prompt written with its label w^lab (B*m, K): the real
    step's batch (step 10) and the meta step's inner batch (step 6)."""
    pairs = list(zip(kept.src.tolist(), kept.sample.tolist()))
    return build_batch(policy.tokenizer, policy.condition([texts[i] for i in kept.src], labels),
                       [responses[b][j] for b, j in pairs], [finished[b][j] for b, j in pairs],
                       policy.max_prompt_tokens, prefs=labels)


def _rows_of(perm: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """For each kept row (prompt ``src``), the kept row of prompt ``perm[src]`` (the first, with top_m > 1)."""
    first = {int(p): i for i, p in reversed(list(enumerate(src.tolist())))}
    return torch.tensor([first.get(int(perm[p]), i) for i, p in enumerate(src.tolist())])


@dataclass
class NetShape:
    """The preference-weight-net's size and outer optimiser (``method.weight_net``): hidden units per head,
    whitened principal directions it reads (``features``; 0: all), Adam's learning rate and eps."""

    hidden: int
    features: int
    lr: float
    adam_eps: float


def build_learner(settings: MetaSettings, num_objectives: int, embeddings: torch.Tensor | None, shape: NetShape,
                  init_seed: int):
    """The learner a Meal run uses: FixedLearner (static, or the uniform control) or NetLearner over
    the whitened PCA features of ``embeddings`` (M, D), its net of ``shape`` seeded by ``init_seed`` from its
    own generator (building it leaves the training random stream untouched)."""
    if settings.lam < 1.0 and settings.control == "uniform":
        return FixedLearner(settings, num_objectives, proposal="uniform")
    if embeddings is None or settings.lam == 1.0:
        return FixedLearner(settings, num_objectives)
    features = PromptFeatures.fit(embeddings, shape.features)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        net = PreferenceWeightNet(features.dims, num_objectives, shape.hidden, settings.tau)
    return NetLearner(net, features(embeddings), settings, shape.lr, shape.adam_eps)

