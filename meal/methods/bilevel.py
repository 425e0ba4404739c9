"""The meta-learner and the bilevel one-step virtual update (method.md steps 2, 3, 5-9).

Notation of method.md: B prompts, K objectives, preferences on the simplex, rewards R normalised.

- :class:`PromptFeatures`        z = whitened PCA projection of the frozen prompt embedding    (step 2)
- :class:`PreferenceWeightNet`   w_phi = g_phi(z, w*) and the relabelling head h_phi(z, w*, R) (steps 2, 5)
- :func:`dynamic_preference`     w~ = lam * w* + (1 - lam) * w_phi                             (step 3)
- :func:`achieved_preference`    w^ = softmax(R / tau)                                        (step 5)
- :func:`label_preference`       w^lab = lam * w~ + (1 - lam) * h_phi                          (step 5)
- :func:`sample_weights`         c = lam + (1 - lam) * c^,  c^ = w_phi . sigmoid(R) / mean     (step 6)
- :func:`virtual_step`           theta' = theta - alpha_in * P * grad_theta L_in(theta, phi)   (step 7)
- :func:`meta_gradient`          grad_phi L_meta(theta'(phi)), by one of two engines           (steps 7-8)
- :class:`MetaGradientStats`     the outer update's raw gradient: norm, cosine to the previous one (step 9)

phi enters the inner loss L_in = mean_i c_i(phi) l_i(theta, w^lab_i(phi)) by two paths: the sample
weight c_i and the label w^lab_i the kept response is trained under (the preference-aware adapters
mix their blocks linearly in w, so l_i is differentiable in w). With the preconditioned step
theta' = theta - alpha P grad L_in (P diagonal, detached) the meta-gradient is exactly

    dL_meta/dphi = -alpha_in * mean_i d/dphi [ c_i(phi) * D_i(w^lab_i(phi)) ],
    D_i(w) = grad_theta l_i(theta, w) . P v,     v = grad L_meta(theta')

The ``autograd`` engine differentiates through the virtual step (double backward); the
``directional`` engine needs no second-order graph over theta. Its modes give the values D_i:
``per_example`` keeps each inner example's gradient from the virtual step (exact, no extra pass,
memory B_in x trainable parameters), ``jvp`` (exact, one forward-mode pass), ``fd`` (a central
finite difference along P v, two forward passes). The label path's derivative dD_i/dw is always
taken by that central difference, whose two forward passes keep a graph to the labels only. All
engines give the same number up to floating point (tests against finite differences in phi).
``first_order`` is an approximation: v is taken at theta instead of theta', so no virtual step is
run (it drops the dependence of v on the step, which is O(alpha_in)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from meal.harness.profiling import NoMeter
from meal.policy.losses import SFTBatch, per_example_nll

Params = dict[str, torch.Tensor]
SumFn = Callable[[torch.Tensor], torch.Tensor]  # a tensor's sum over data-parallel processes (autograd through it)


@dataclass
class PromptFeatures:
    """z = ((e - mean) @ components) / scale: the frozen prompt embedding, centred, projected on its
    top ``d`` principal directions and whitened (method.md step 2). Fitted once on the training
    prompts before training: raw embeddings of one policy share a large common direction (mean
    cosine 0.89 to their centroid on the embedded task), which leaves a net nothing to tell prompts
    apart by; whitened, each kept direction has unit variance over the training prompts."""

    mean: torch.Tensor  # (D,)
    components: torch.Tensor  # (D, d)
    scale: torch.Tensor  # (d,)

    @classmethod
    def fit(cls, emb: torch.Tensor, dims: int) -> "PromptFeatures":
        """PCA of ``emb`` (M, D); ``dims`` is capped at min(M - 1, D); 0 keeps every direction."""
        emb = emb.double()
        mean = emb.mean(0)
        _, s, vh = torch.linalg.svd(emb - mean, full_matrices=False)
        d = min(dims or vh.shape[0], max(1, emb.shape[0] - 1), vh.shape[0])
        scale = (s[:d] / math.sqrt(max(1, emb.shape[0] - 1))).clamp_min(1e-8)
        return cls(mean.float(), vh[:d].T.float().contiguous(), scale.float())

    def __call__(self, emb: torch.Tensor) -> torch.Tensor:
        """(M, D) -> (M, d)."""
        return ((emb.float() - self.mean) @ self.components) / self.scale

    @property
    def dims(self) -> int:
        return self.components.shape[1]


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    """One hidden layer; the last layer starts at zero, so the head starts as its residual base."""
    mlp = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return mlp


class PreferenceWeightNet(nn.Module):
    """The meta-learner's two heads over the prompt feature z (B, d) and the target w* (B, K):

    - ``propose`` (step 2): w_phi = softmax(log w* + g(z, w*)), which is w* at initialisation;
    - ``relabel`` (step 5): h_phi = softmax(R / tau + f(z, w*, R, w^)), which is w^ = softmax(R / tau) at
      initialisation, R (B, K) the kept response's normalised rewards.

    Each head is one hidden layer whose last layer starts at zero (a residual on its base): the
    untrained net is the static method with hindsight labels, and whatever it proposes later it
    learned. Outputs (B, K), rows on the simplex.
    """

    FLOOR = 1e-6  # log w* of a grid preference with a zero weight stays finite

    def __init__(self, feature_dim: int, num_objectives: int, hidden: int = 128, tau: float = 1.0):
        super().__init__()
        k = num_objectives
        self.tau = tau
        self.proposal = _mlp(feature_dim + k, hidden, k)
        self.relabelling = _mlp(feature_dim + 3 * k, hidden, k)

    def _dtype(self) -> torch.dtype:
        return self.proposal[0].weight.dtype

    def proposal_logits(self, z: torch.Tensor, w_star: torch.Tensor) -> torch.Tensor:
        """g(z, w*) (B, K): what the net adds to log w*."""
        return self.proposal(torch.cat([z, w_star], -1).to(self._dtype()))

    def relabel_logits(self, z: torch.Tensor, w_star: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        """f(z, w*, R, w^) (B, K): what the net adds to R / tau."""
        r = rewards.to(self._dtype())
        x = torch.cat([z.to(r.dtype), w_star.to(r.dtype), r, achieved_preference(r, self.tau)], -1)
        return self.relabelling(x)

    def propose(self, z: torch.Tensor, w_star: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """w_phi(z, w*) (B, K); ``logits``: use these instead of g(z, w*) (the shuffled control)."""
        g = self.proposal_logits(z, w_star) if logits is None else logits
        return torch.softmax(w_star.to(g.dtype).clamp_min(self.FLOOR).log() + g, -1)

    def relabel(self, z: torch.Tensor, w_star: torch.Tensor, rewards: torch.Tensor,
                logits: torch.Tensor | None = None) -> torch.Tensor:
        """h_phi(z, w*, R) (B, K)."""
        f = self.relabel_logits(z, w_star, rewards) if logits is None else logits
        return torch.softmax(rewards.to(f.dtype) / self.tau + f, -1)

    def forward(self, z: torch.Tensor, w_star: torch.Tensor) -> torch.Tensor:
        return self.propose(z, w_star)


def dynamic_preference(w_star: torch.Tensor, w_phi: torch.Tensor, lam: float) -> torch.Tensor:
    """w~ = lam * w* + (1 - lam) * w_phi (B, K); lam = 1 gives the target exactly."""
    return w_star if lam == 1.0 else lam * w_star + (1.0 - lam) * w_phi


def achieved_preference(rewards: torch.Tensor, tau: float) -> torch.Tensor:
    """w^ = softmax(R / tau): the trade-off a kept response achieved, from its rewards (B, K)."""
    return torch.softmax(rewards / tau, dim=-1)


def label_preference(w_tilde: torch.Tensor, h: torch.Tensor, lam: float) -> torch.Tensor:
    """w^lab = lam * w~ + (1 - lam) * h: the preference the kept response is trained under; h is the
    relabelling head's output (the fixed hindsight rule w^ where no net learns it)."""
    return w_tilde if lam == 1.0 else lam * w_tilde + (1.0 - lam) * h


def masked_ones(ok: torch.Tensor | None, n: int | None = None, total: SumFn | None = None) -> torch.Tensor:
    """Weights 1 on the rows where ``ok`` (B,) holds and 0 elsewhere, rescaled to mean 1 over all rows
    (so that mean_i c_i l_i is the mean over the valid rows); all ones without a mask. ``total``: the sum
    over data-parallel processes (None: one process), so that the share of valid rows is the whole batch's."""
    if ok is None:
        return torch.ones(n)
    okf = ok.float()
    if total is None:
        return okf / okf.mean() if okf.any() else okf
    valid, rows = total(torch.stack([okf.sum(), torch.tensor(float(len(okf)))])).tolist()
    return okf / (valid / rows) if valid > 0 else okf


def sample_weights(w_phi: torch.Tensor, rewards: torch.Tensor, lam: float, ok: torch.Tensor | None = None,
                   total: SumFn | None = None) -> torch.Tensor:
    """c_i = lam + (1 - lam) * c^_i with c^_i = w_phi(x_i) . sigmoid(R_i), normalised to mean 1 (B,).

    Differentiable in w_phi; with lam = 1 every weight is exactly 1. ``ok`` (B,) marks the rows whose
    kept response is valid: the others get weight 0, c^ is normalised over the valid rows, and the
    weights are rescaled by :func:`masked_ones` so that the weighted mean covers the valid rows only.
    ``total``: a differentiable sum over data-parallel processes (None: one process): the mean that
    normalises c^ is then the whole batch's, and its gradient reaches every process's w_phi.
    """
    mask = masked_ones(ok, rewards.shape[0], total).to(rewards.device)
    if lam == 1.0:
        return mask.to(rewards.dtype)
    c_hat = (w_phi * torch.sigmoid(rewards.to(w_phi.dtype))).sum(-1)
    valid = mask > 0
    if total is None:
        if not valid.any():
            return mask.to(c_hat.dtype)
        c_hat = c_hat / c_hat[valid].mean()
    else:  # every process joins the sum, whether or not it holds a valid row
        sums = total(torch.stack([c_hat[valid].sum(), valid.sum().to(c_hat.dtype)]))
        if sums[1].item() == 0:
            return mask.to(c_hat.dtype)
        c_hat = c_hat / (sums[0] / sums[1].detach())
    return (lam + (1.0 - lam) * c_hat) * mask.to(c_hat.dtype)


def virtual_step(params: Params, grads: Mapping[str, torch.Tensor], alpha: float,
                 precondition: Mapping[str, torch.Tensor] | None = None) -> Params:
    """theta' = theta - alpha * P * g on a copy (the module is not touched); P = 1 without ``precondition``."""
    if precondition is None:
        return {n: p - alpha * grads[n] for n, p in params.items()}
    return {n: p - alpha * precondition[n] * grads[n] for n, p in params.items()}


def _state_of(opt, p: torch.Tensor) -> dict:
    """A torch optimiser's state for ``p`` ({} for none, or for an engine that keeps it elsewhere: DeepSpeed's
    partitioned optimiser; the preconditioner then starts from the current gradient alone)."""
    state = getattr(opt, "state", None)
    return state.get(p, {}) if isinstance(state, dict) else {}


def adam_preconditioner(optimizer: torch.optim.Optimizer | None, params: Params, grads: Mapping[str, torch.Tensor],
                        beta2: float = 0.999, eps: float = 1e-8) -> Params:
    """P = 1 / (sqrt(v^) + eps), detached: the per-parameter scale AdamW's next step would use with the
    gradient ``grads``: v = beta2 v_prev + (1 - beta2) g^2 from the optimiser's second moment v_prev
    (none before its first step), bias-corrected, v^ = v / (1 - beta2^(t+1)). Including g bounds
    |P g| by about 1 per parameter, as in AdamW's own step. ``optimizer``: a torch optimiser, or an
    engine wrapping one as ``.optimizer`` (meal.harness.distributed)."""
    opt = getattr(optimizer, "optimizer", optimizer)
    out = {}
    for n, p in params.items():
        state = _state_of(opt, p)
        g2 = grads[n].detach() ** 2
        group = next((g for g in getattr(opt, "param_groups", []) if any(q is p for q in g["params"])), {})
        b2, e = group.get("betas", (0.9, beta2))[1], group.get("eps", eps)
        if "exp_avg_sq" in state:
            t = float(state["step"]) + 1
            v_hat = (b2 * state["exp_avg_sq"].detach() + (1 - b2) * g2) / (1.0 - b2 ** t)
        else:
            v_hat = g2  # Adam's first step: (1 - b2) g^2 / (1 - b2)
        out[n] = (1.0 / (v_hat.sqrt() + e)).to(p.dtype)
    return out


@dataclass
class MetaStepResult:
    """What the meta step measured: L_meta at theta' (or theta for first_order) and the values D_i."""

    meta_loss: float
    directional: torch.Tensor | None  # (B_in,) grad l_i . P v (directional engine only)


@dataclass
class MetaGradSettings:
    """How steps 7-8 are computed (method.md): step size and preconditioner of the virtual step, the engine."""

    alpha: float
    engine: str = "directional"  # directional | autograd
    mode: str = "per_example"  # directional engine: per_example | jvp | fd
    fd_eps: float = 3e-2  # central differences: step relative to the parameters' norm along P v
    first_order: bool = False
    micro_batch_size: int | None = None
    # P (name -> tensor), or a function of the inner gradient g (detached) that returns it; None: plain SGD
    precondition: Params | Callable[[Params], Params] | None = None
    # data parallelism: sums a list of tensors over the processes in place (None: one process), and their
    # number. Each process holds an equal share of the inner batch and its share of the meta loss (the
    # shares summing to L_meta); the virtual step then takes the global inner gradient and the direction v
    # is the global meta loss's, so the processes' averaged meta-gradient is the single process's
    sum_over_processes: Callable[[list[torch.Tensor]], None] | None = None
    processes: int = 1

    def global_sum(self, tensors: list[torch.Tensor]) -> None:
        if self.sum_over_processes is not None and self.processes > 1:
            self.sum_over_processes(tensors)


@dataclass
class InnerLoss:
    """The inner batch and how it depends on phi: ``weights()`` -> c(phi) (B_in,) and ``labels()`` ->
    w^lab(phi) (B_in, K) or None (label path off: the batch's own, fixed preferences), each with its
    graph to phi."""

    batch: SFTBatch
    weights: Callable[[], torch.Tensor]
    labels: Callable[[], torch.Tensor | None]


MetaLossFn = Callable[[Params], torch.Tensor]


def meta_gradient(model: nn.Module, params: Params, inner: InnerLoss, meta_loss_fn: MetaLossFn,
                  phi: Sequence[torch.Tensor], settings: MetaGradSettings, meter=NoMeter()) -> MetaStepResult:
    """Accumulate grad_phi L_meta(theta'(phi)) into the ``.grad`` of ``phi`` (the net's parameters).

    ``params``: the trainable parameters theta (name -> leaf tensor); ``inner``: the inner batch (B_in
    examples) with its weights and labels as functions of phi; ``meta_loss_fn(p)``: L_meta evaluated
    at parameters p. Returns the meta loss and the values D_i = grad_theta l_i(theta) . P v. ``meter``
    times the phases ``inner_step`` (the virtual step) and ``meta_step`` (meta loss, its gradient, the
    hypergradient).

    Gradient checkpointing is off inside (:func:`meal.policy.model.checkpointing_off`): a checkpointed
    layer recomputes its forward pass with the module's own weights, not the virtual step's theta' that
    ``functional_call`` put in for the forward pass (torch's checkpoint then refuses, or, where the shapes
    happen to agree, would differentiate at the wrong weights).
    """
    from meal.policy.model import checkpointing_off

    if settings.engine not in ("autograd", "directional"):
        raise ValueError(f"unknown meta-gradient engine {settings.engine!r}: directional | autograd")
    engine = _autograd_engine if settings.engine == "autograd" else _directional_engine
    with checkpointing_off(model):
        return engine(model, params, inner, meta_loss_fn, phi, settings, meter)


def _with_labels(batch: SFTBatch, labels: torch.Tensor | None) -> SFTBatch:
    return batch if labels is None else replace(batch, prefs=labels.to(batch.input_ids.device))


def _autograd_engine(model, params, inner: InnerLoss, meta_loss_fn, phi, s: MetaGradSettings, meter
                     ) -> MetaStepResult:
    names = list(params)
    with meter.phase("inner_step"):
        c = inner.weights()  # (B_in,) graph to phi
        losses = per_example_nll(model, _with_labels(inner.batch, inner.labels()), params)  # graph to theta, phi
        grads = torch.autograd.grad((c * losses).mean(), [params[n] for n in names], create_graph=True)
        g = dict(zip(names, grads))
        if s.processes > 1:  # the global mean's value, this process's own graph to phi
            mean = [x.detach().clone() for x in grads]
            s.global_sum(mean)
            g = {n: x + (m / s.processes - x.detach()) for (n, x), m in zip(g.items(), mean)}
        s = replace(s, precondition=_resolve(s.precondition, g))
    with meter.phase("meta_step"):
        if s.first_order:  # linearise L_meta around theta: v . (theta' - theta)
            v = _grad(meta_loss_fn, params)
            loss = meta_loss_fn(params).detach().reshape(1)
            s.global_sum([*v.values(), loss])
            step = virtual_step({n: torch.zeros_like(p) for n, p in params.items()}, g, s.alpha, s.precondition)
            surrogate = sum((v[n] * step[n]).sum() for n in names)
            meta_loss = loss.item()
        elif s.processes > 1:  # v = grad of the global L_meta at theta', then v . theta'(phi)
            theta_prime = virtual_step(params, g, s.alpha, s.precondition)
            local = meta_loss_fn(theta_prime)
            v = list(torch.autograd.grad(local, [theta_prime[n] for n in names], retain_graph=True))
            loss = local.detach().reshape(1)
            s.global_sum([*v, loss])
            surrogate = sum((vi * theta_prime[n]).sum() for n, vi in zip(names, v))
            meta_loss = loss.item()
        else:
            theta_prime = virtual_step(params, g, s.alpha, s.precondition)
            surrogate = meta_loss_fn(theta_prime)
            meta_loss = surrogate.item()
        _accumulate(surrogate, phi)
    return MetaStepResult(meta_loss, None)


def _resolve(precondition, g: Params) -> Params | None:
    """P itself: a callable precondition is evaluated at the inner gradient g (detached)."""
    if callable(precondition):
        return precondition({n: x.detach() for n, x in g.items()})
    return precondition


def _accumulate(surrogate: torch.Tensor, phi: Sequence[torch.Tensor]) -> None:
    """Add d surrogate / d phi to each phi's ``.grad`` (theta's ``.grad`` is left alone)."""
    if not surrogate.requires_grad:  # nothing depends on phi (e.g. every inner row invalid)
        return
    for p, g in zip(phi, torch.autograd.grad(surrogate, list(phi), allow_unused=True)):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g


def _grad(loss_fn: MetaLossFn, at: Params) -> Params:
    """grad of loss_fn at ``at`` (detached copies, no graph kept)."""
    leaf = {n: p.detach().requires_grad_(True) for n, p in at.items()}
    loss = loss_fn(leaf)
    grads = torch.autograd.grad(loss, list(leaf.values()))
    return {n: g.detach() for n, g in zip(leaf, grads)}


def _directional_engine(model, params, inner: InnerLoss, meta_loss_fn, phi, s: MetaGradSettings, meter
                        ) -> MetaStepResult:
    theta = {n: p.detach() for n, p in params.items()}
    n_in, mb = len(inner.batch), s.micro_batch_size or len(inner.batch)
    per_example = []  # mode "per_example": grad l_i(theta) of every inner example, kept for D_i
    with torch.no_grad():
        c_det = inner.weights().detach()
        lab = inner.labels()
        lab_det = None if lab is None else lab.detach()
    batch = _with_labels(inner.batch, lab_det)  # the labels' values, no graph
    with meter.phase("inner_step"):
        at = theta
        if not s.first_order or s.mode == "per_example":
            # step 7: g = grad_theta mean_i c_i l_i(theta), accumulated over micro-batches, no graph kept
            step = 1 if s.mode == "per_example" else mb
            g = {n: torch.zeros_like(p) for n, p in theta.items()}
            leaf = {n: p.clone().requires_grad_(True) for n, p in theta.items()}
            for b in range(0, n_in, step):
                losses = per_example_nll(model, batch.slice(slice(b, b + step)), leaf)  # (b,)
                if s.mode == "per_example":  # grad l_b, kept; g += c_b / B * grad l_b
                    grads = torch.autograd.grad(losses.sum(), list(leaf.values()))
                    per_example.append(grads)
                    scale = c_det[b] / n_in
                else:
                    grads = torch.autograd.grad((c_det[b:b + step] * losses).sum() / n_in, list(leaf.values()))
                    scale = 1.0
                for n, gi in zip(leaf, grads):
                    g[n] += scale * gi
            s.global_sum(list(g.values()))  # the global inner gradient: the processes' equal shares' mean
            if s.processes > 1:
                g = {n: x / s.processes for n, x in g.items()}
            s = replace(s, precondition=_resolve(s.precondition, g))
            at = theta if s.first_order else virtual_step(theta, g, s.alpha, s.precondition)
    with meter.phase("meta_step"):
        # step 8: v = grad L_meta at theta' (theta for first_order); the direction u = P v
        leaf = {n: p.detach().clone().requires_grad_(True) for n, p in at.items()}
        meta_loss = meta_loss_fn(leaf)
        v = dict(zip(leaf, torch.autograd.grad(meta_loss, list(leaf.values()))))
        meta_loss = meta_loss.detach().reshape(1)
        s.global_sum([*v.values(), meta_loss])  # v and L_meta of the global meta batch: the shares' sums
        u = v if s.precondition is None else {n: s.precondition[n] * v[n] for n in v}
        del leaf, at
        # D_i = grad l_i(theta) . u for every inner example
        if s.mode == "per_example":
            d = torch.stack([sum((gi.double() * u[n].double()).sum() for n, gi in zip(u, grads))
                             for grads in per_example])
        else:
            d = torch.cat([_directional(model, batch.slice(slice(b, b + mb)), theta, u, s.mode, s.fd_eps)
                           for b in range(0, n_in, mb)])
        d = d.to(c_det.dtype)
        # dL_meta/dphi = -alpha * mean_i d/dphi [c_i(phi) D_i(w^lab_i(phi))]: the weight path through c with
        # the exact D_i; the label path through a central difference along u whose forward passes keep a
        # graph to the labels only (its value is D_i again, subtracted so that only its derivative counts)
        surrogate = (inner.weights() * d).mean()
        if lab is not None:
            labels = inner.labels()
            d_lab = torch.cat([_fd_labelled(model, batch.slice(slice(b, b + mb)), labels[b:b + mb], theta, u,
                                            s.fd_eps) for b in range(0, n_in, mb)]).to(c_det.dtype)
            surrogate = surrogate + (c_det * (d_lab - d_lab.detach())).mean()
        _accumulate(-s.alpha * surrogate, phi)
    return MetaStepResult(meta_loss.item(), d.detach().float().cpu())


def _fd_step(theta: Params, u: Params, eps_rel: float) -> float:
    """The central difference's step along u: ``eps_rel`` of the parameters' norm (at least 1) over |u|."""
    u_norm = torch.sqrt(sum((x.double() ** 2).sum() for x in u.values())).item()
    if u_norm == 0:
        return 0.0
    t_norm = torch.sqrt(sum((x.double() ** 2).sum() for x in theta.values())).item()
    return float(eps_rel * max(t_norm, 1.0) / u_norm)


@torch.no_grad()
def _fd(model, batch, theta, u, eps_rel):
    eps = _fd_step(theta, u, eps_rel)
    if eps == 0:
        return torch.zeros(len(batch), device=batch.input_ids.device)
    plus = per_example_nll(model, batch, {n: theta[n] + eps * u[n] for n in theta})
    minus = per_example_nll(model, batch, {n: theta[n] - eps * u[n] for n in theta})
    return (plus.double() - minus.double()) / (2 * eps)


def _fd_labelled(model, batch: SFTBatch, labels: torch.Tensor, theta: Params, u: Params, eps_rel: float
                 ) -> torch.Tensor:
    """(b,) (l_i(theta + eps u, w_i) - l_i(theta - eps u, w_i)) / 2 eps with a graph to the labels w only."""
    eps = _fd_step(theta, u, eps_rel)
    if eps == 0:
        return labels.sum(-1) * 0.0
    lab = _with_labels(batch, labels)
    plus = per_example_nll(model, lab, {n: theta[n] + eps * u[n] for n in theta})
    minus = per_example_nll(model, lab, {n: theta[n] - eps * u[n] for n in theta})
    return (plus.double() - minus.double()) / (2 * eps)


def _directional(model, batch, theta, u, mode, eps_rel) -> torch.Tensor:
    """(b,) grad l_i(theta) . u for the examples of ``batch`` (modes fd and jvp)."""
    if mode == "fd":
        return _fd(model, batch, theta, u, eps_rel)
    if mode == "jvp":
        names = list(theta)
        _, tangent = torch.func.jvp(lambda *ps: per_example_nll(model, batch, dict(zip(names, ps))),
                                    tuple(theta[n] for n in names), tuple(u[n] for n in names))
        return tangent.detach()
    raise ValueError(f"unknown directional mode {mode!r}: fd | jvp")


class MetaGradientStats:
    """The raw meta-gradient's norm and its cosine to the previous one (is the signal consistent?)."""

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None

    def update(self, params: Sequence[torch.Tensor]) -> dict[str, float]:
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double() for p in params])
        out = {"meta/grad_norm": g.norm().item()}
        if self.previous is not None and g.norm() > 0 and self.previous.norm() > 0:
            out["meta/grad_cosine"] = torch.nn.functional.cosine_similarity(g, self.previous, dim=0).item()
        self.previous = g
        return out
