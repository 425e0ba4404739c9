"""The meta-learner and the bilevel one-step virtual update (method.md steps 2, 3, 5-9).

Notation of method.md: B prompts, K objectives, preferences on the simplex, rewards R normalised.

- :class:`PreferenceWeightNet`   w_phi(x) = softmax(MLP_phi([e(x) ; w*]))            (step 2)
- :func:`dynamic_preference`     w~ = lam * w* + (1 - lam) * w_phi                      (step 3)
- :func:`achieved_preference`    w^ = softmax(R / tau)                                 (step 5)
- :func:`label_preference`       w^lab = lam * w~ + (1 - lam) * w^                      (step 5)
- :func:`sample_weights`         c = lam + (1 - lam) * c^,  c^ = w_phi . sigmoid(R) / mean (step 6)
- :func:`virtual_step`           theta' = theta - alpha_in * grad_theta L_in(theta, phi) (step 7)
- :func:`meta_gradient`          grad_phi L_meta(theta'(phi)), by one of two engines    (steps 7-8)

Since phi enters L_in = mean_i c_i(phi) l_i(theta) only through c, the meta-gradient is exactly

    dL_meta/dphi = -alpha_in * mean_i (dc_i/dphi) * (grad_theta l_i(theta) . v),   v = grad L_meta(theta')

The ``autograd`` engine differentiates through the virtual step (double backward); the
``directional`` engine computes the B directional derivatives ``grad l_i . v`` and needs no
second-order graph. Its modes: ``per_example`` keeps each inner example's gradient from the
virtual step (exact, no extra pass, memory B_in x trainable parameters), ``jvp`` (exact, one
forward-mode pass), ``fd`` (a central finite difference, two forward passes). All give the same
number up to floating point.
``first_order`` is an approximation: v is taken at theta instead of theta', so no virtual step is
run (it drops the dependence of v on the step, which is O(alpha_in)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from meal.losses import SFTBatch, per_example_nll
from meal.profiling import NoMeter

Params = dict[str, torch.Tensor]


class PreferenceWeightNet(nn.Module):
    """w_phi(x) = softmax(MLP([e ; w*])): one hidden layer, output on the K-simplex.

    Input: embeddings (B, D) and target preferences (B, K); output (B, K), rows sum to 1.
    """

    def __init__(self, embed_dim: int, num_objectives: int, hidden: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(embed_dim + num_objectives, hidden), nn.Tanh(),
                                 nn.Linear(hidden, num_objectives))

    def forward(self, emb: torch.Tensor, w_star: torch.Tensor) -> torch.Tensor:
        x = torch.cat([emb, w_star], dim=-1).to(self.mlp[0].weight.dtype)
        return torch.softmax(self.mlp(x), dim=-1)


def dynamic_preference(w_star: torch.Tensor, w_phi: torch.Tensor, lam: float) -> torch.Tensor:
    """w~ = lam * w* + (1 - lam) * w_phi (B, K); lam = 1 gives the target exactly."""
    return w_star if lam == 1.0 else lam * w_star + (1.0 - lam) * w_phi


def achieved_preference(rewards: torch.Tensor, tau: float) -> torch.Tensor:
    """w^ = softmax(R / tau): the trade-off a kept response achieved, from its rewards (B, K)."""
    return torch.softmax(rewards / tau, dim=-1)


def label_preference(w_tilde: torch.Tensor, w_hat: torch.Tensor, lam: float) -> torch.Tensor:
    """w^lab = lam * w~ + (1 - lam) * w^: the preference written into the training prompt."""
    return w_tilde if lam == 1.0 else lam * w_tilde + (1.0 - lam) * w_hat


def masked_ones(ok: torch.Tensor | None, n: int | None = None) -> torch.Tensor:
    """Weights 1 on the rows where ``ok`` (B,) holds and 0 elsewhere, rescaled to mean 1 over all rows
    (so that mean_i c_i l_i is the mean over the valid rows); all ones without a mask."""
    if ok is None:
        return torch.ones(n)
    okf = ok.float()
    return okf / okf.mean() if okf.any() else okf


def sample_weights(w_phi: torch.Tensor, rewards: torch.Tensor, lam: float, ok: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """c_i = lam + (1 - lam) * c^_i with c^_i = w_phi(x_i) . sigmoid(R_i), normalised to mean 1 (B,).

    Differentiable in w_phi; with lam = 1 every weight is exactly 1. ``ok`` (B,) marks the rows whose
    kept response is valid: the others get weight 0, c^ is normalised over the valid rows, and the
    weights are rescaled by :func:`masked_ones` so that the weighted mean covers the valid rows only.
    """
    mask = masked_ones(ok, rewards.shape[0]).to(rewards.device)
    if lam == 1.0:
        return mask.to(rewards.dtype)
    c_hat = (w_phi * torch.sigmoid(rewards.to(w_phi.dtype))).sum(-1)
    valid = mask > 0
    if not valid.any():
        return mask.to(c_hat.dtype)
    c_hat = c_hat / c_hat[valid].mean()
    return (lam + (1.0 - lam) * c_hat) * mask.to(c_hat.dtype)


def virtual_step(params: Params, grads: Mapping[str, torch.Tensor], alpha: float) -> Params:
    """theta' = theta - alpha * g: one plain SGD step on a copy (the module is not touched)."""
    return {n: p - alpha * grads[n] for n, p in params.items()}


@dataclass
class MetaStepResult:
    """What the meta step measured: L_meta at theta' (or theta for first_order) and the dots d_i."""

    meta_loss: float
    directional: torch.Tensor | None  # (B_in,) grad l_i . v (directional engine only)


MetaLossFn = Callable[[Params], torch.Tensor]


def meta_gradient(model: nn.Module, params: Params, inner: SFTBatch, c_fn: Callable[[], torch.Tensor],
                  meta_loss_fn: MetaLossFn, alpha: float, phi: Sequence[torch.Tensor],
                  engine: str = "directional", mode: str = "fd",
                  fd_eps: float = 1e-3, first_order: bool = False, micro_batch_size: int | None = None,
                  meter=NoMeter()) -> MetaStepResult:
    """Accumulate grad_phi L_meta(theta'(phi)) into the ``.grad`` of ``phi`` (the net's parameters).

    ``params``: the trainable parameters theta (name -> leaf tensor); ``inner``: the inner batch
    (B_in examples); ``c_fn()``: the sample weights c(phi) (B_in,) with their graph to phi;
    ``meta_loss_fn(p)``: L_meta evaluated at parameters p. Returns the meta loss and the
    directional derivatives d_i = grad_theta l_i(theta) . v. ``meter`` times the phases
    ``inner_step`` (the virtual step) and ``meta_step`` (meta loss, its gradient, the hypergradient).
    """
    if engine == "autograd":
        return _autograd_engine(model, params, inner, c_fn, meta_loss_fn, alpha, phi, first_order, meter)
    if engine == "directional":
        return _directional_engine(model, params, inner, c_fn, meta_loss_fn, alpha, phi, mode, fd_eps,
                                   first_order, micro_batch_size or len(inner), meter)
    raise ValueError(f"unknown meta-gradient engine {engine!r}: directional | autograd")


def _autograd_engine(model, params, inner, c_fn, meta_loss_fn, alpha, phi, first_order, meter) -> MetaStepResult:
    names = list(params)
    with meter.phase("inner_step"):
        c = c_fn()  # (B_in,) graph to phi
        losses = per_example_nll(model, inner, params)  # (B_in,) graph to theta
        grads = torch.autograd.grad((c * losses).mean(), [params[n] for n in names], create_graph=True)
        g = dict(zip(names, grads))
    with meter.phase("meta_step"):
        if first_order:  # linearise L_meta around theta: v . (theta' - theta)
            v = _grad(meta_loss_fn, params)
            meta_loss = meta_loss_fn(params).item()
            surrogate = sum((v[n] * (-alpha * g[n])).sum() for n in names)
        else:
            theta_prime = virtual_step(params, g, alpha)
            surrogate = meta_loss_fn(theta_prime)
            meta_loss = surrogate.item()
        _accumulate(surrogate, phi)
    return MetaStepResult(meta_loss, None)


def _accumulate(surrogate: torch.Tensor, phi: Sequence[torch.Tensor]) -> None:
    """Add d surrogate / d phi to each phi's ``.grad`` (theta's ``.grad`` is left alone)."""
    for p, g in zip(phi, torch.autograd.grad(surrogate, list(phi), allow_unused=True)):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g


def _grad(loss_fn: MetaLossFn, at: Params) -> Params:
    """grad of loss_fn at ``at`` (detached copies, no graph kept)."""
    leaf = {n: p.detach().requires_grad_(True) for n, p in at.items()}
    loss = loss_fn(leaf)
    grads = torch.autograd.grad(loss, list(leaf.values()))
    return {n: g.detach() for n, g in zip(leaf, grads)}


def _directional_engine(model, params, inner, c_fn, meta_loss_fn, alpha, phi, mode, fd_eps, first_order, mb,
                        meter) -> MetaStepResult:
    theta = {n: p.detach() for n, p in params.items()}
    per_example = []  # mode "per_example": grad l_i(theta) of every inner example, kept for d_i
    with meter.phase("inner_step"):
        with torch.no_grad():
            c_det = c_fn().detach()
        at = theta
        if not first_order or mode == "per_example":
            # step 7: g = grad_theta mean_i c_i l_i(theta), accumulated over micro-batches, no graph kept
            step = 1 if mode == "per_example" else mb
            g = {n: torch.zeros_like(p) for n, p in theta.items()}
            leaf = {n: p.clone().requires_grad_(True) for n, p in theta.items()}
            for s in range(0, len(inner), step):
                losses = per_example_nll(model, inner.slice(slice(s, s + step)), leaf)  # (b,)
                if mode == "per_example":  # grad l_s, kept; g += c_s / B * grad l_s
                    grads = torch.autograd.grad(losses.sum(), list(leaf.values()))
                    per_example.append(grads)
                    scale = c_det[s] / len(inner)
                else:
                    grads = torch.autograd.grad((c_det[s:s + step] * losses).sum() / len(inner),
                                                list(leaf.values()))
                    scale = 1.0
                for n, gi in zip(leaf, grads):
                    g[n] += scale * gi
            at = theta if first_order else virtual_step(theta, g, alpha)
    with meter.phase("meta_step"):
        # step 8: v = grad L_meta at theta' (theta for first_order)
        leaf = {n: p.detach().clone().requires_grad_(True) for n, p in at.items()}
        meta_loss = meta_loss_fn(leaf)
        v = dict(zip(leaf, torch.autograd.grad(meta_loss, list(leaf.values()))))
        del leaf, at
        # d_i = grad l_i(theta) . v for every inner example
        if mode == "per_example":
            d = torch.stack([sum((gi.double() * v[n].double()).sum() for n, gi in zip(v, grads))
                             for grads in per_example])
        else:
            d = torch.cat([_directional(model, inner.slice(slice(s, s + mb)), theta, v, mode, fd_eps)
                           for s in range(0, len(inner), mb)])
        # dL_meta/dphi = -alpha * mean_i (dc_i/dphi) d_i
        surrogate = -alpha * (c_fn() * d.to(c_det.dtype)).mean()
        _accumulate(surrogate, phi)
    return MetaStepResult(meta_loss.item(), d.detach().float().cpu())


@torch.no_grad()
def _fd(model, batch, theta, v, eps_rel):
    v_norm = torch.sqrt(sum((x.double() ** 2).sum() for x in v.values()))
    if v_norm == 0:
        return torch.zeros(len(batch), device=batch.input_ids.device)
    t_norm = torch.sqrt(sum((x.double() ** 2).sum() for x in theta.values()))
    eps = float(eps_rel * max(t_norm.item(), 1.0) / v_norm.item())
    plus = per_example_nll(model, batch, {n: theta[n] + eps * v[n] for n in theta})
    minus = per_example_nll(model, batch, {n: theta[n] - eps * v[n] for n in theta})
    return (plus.double() - minus.double()) / (2 * eps)


def _directional(model, batch, theta, v, mode, eps_rel) -> torch.Tensor:
    """(b,) grad l_i(theta) . v for the examples of ``batch`` (modes fd and jvp)."""
    if mode == "fd":
        return _fd(model, batch, theta, v, eps_rel)
    if mode == "jvp":
        names = list(theta)
        _, tangent = torch.func.jvp(lambda *ps: per_example_nll(model, batch, dict(zip(names, ps))),
                                    tuple(theta[n] for n in names), tuple(v[n] for n in names))
        return tangent.detach()
    raise ValueError(f"unknown directional mode {mode!r}: fd | jvp")
