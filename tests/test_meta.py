"""The meta-learner: hypergradients against finite differences, the two engines, lam = 1 == static."""

import os

import pytest
import torch
from safetensors.torch import load_file

from meal.losses import build_batch, per_example_nll
from meal.meta import (PreferenceWeightNet, achieved_preference, dynamic_preference, label_preference,
                       meta_gradient, sample_weights, virtual_step)
from meal.trainer import train
from tests.conftest import tiny_config

ALPHA = 0.5


@pytest.fixture(scope="module")
def bilevel(tiny_llama):
    """A float64 tiny Llama (eager attention), an inner batch of 4 and a meta batch of 2, a net."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64, attn_implementation="eager")
    p = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    inner = build_batch(tok, [p.format(q) for q in ["a", "bb", "ccc", "dddd"]],
                        ["one two", "three", "four five six", "seven"])
    meta = build_batch(tok, [p.format(q) for q in ["x", "yy"]], ["eight nine", "ten"])
    params = {n: q for n, q in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    net = PreferenceWeightNet(6, 2, 8).double()
    emb = torch.randn(4, 6, generator=g, dtype=torch.float64)
    w_star = torch.distributions.Dirichlet(torch.ones(2)).sample((4,)).double()
    rewards = torch.randn(4, 2, generator=g, dtype=torch.float64)
    return model, params, inner, meta, net, emb, w_star, rewards


def _fns(model, meta, net, emb, w_star, rewards, lam=0.5):
    def c_fn():
        return sample_weights(net(emb, w_star), rewards, lam)

    def meta_loss_fn(p):
        return per_example_nll(model, meta, p).mean()

    return c_fn, meta_loss_fn


def _engine_grad(bilevel, **kw):
    model, params, inner, meta, net, emb, w_star, rewards = bilevel
    c_fn, meta_loss_fn = _fns(model, meta, net, emb, w_star, rewards)
    net.zero_grad()
    meta_gradient(model, params, inner, c_fn, meta_loss_fn, ALPHA, list(net.parameters()), **kw)
    return torch.cat([q.grad.flatten() for q in net.parameters()]).clone()


def _meta_objective(bilevel) -> float:
    """L_meta(theta'(phi)) computed plainly: weights c(phi), one SGD step, the meta loss."""
    model, params, inner, meta, net, emb, w_star, rewards = bilevel
    c_fn, meta_loss_fn = _fns(model, meta, net, emb, w_star, rewards)
    with torch.no_grad():
        c = c_fn()
    loss = (c * per_example_nll(model, inner, params)).mean()
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    with torch.no_grad():
        return meta_loss_fn(virtual_step(params, grads, ALPHA)).item()


def _fd_hypergradient(bilevel, direction: torch.Tensor, eps: float = 0.1) -> float:
    """Richardson-extrapolated central difference of L(phi) along the unit vector ``direction``.

    eps is not tiny: LlamaRMSNorm computes in float32 even in a float64 model, so the loss carries
    ~3e-9 relative noise, so a small eps measures noise; (4 D(eps/2) - D(eps)) / 3 at eps = 0.1 has
    O(eps^4) truncation error and noise below 1e-6.
    """
    net = bilevel[4]
    flat = torch.nn.utils.parameters_to_vector(net.parameters()).detach().clone()

    def central(h):
        vals = []
        for sign in (1, -1):
            torch.nn.utils.vector_to_parameters(flat + sign * h * direction, net.parameters())
            vals.append(_meta_objective(bilevel))
        return (vals[0] - vals[1]) / (2 * h)

    try:
        return (4 * central(eps / 2) - central(eps)) / 3
    finally:
        torch.nn.utils.vector_to_parameters(flat, net.parameters())


@pytest.mark.parametrize("engine,mode", [("autograd", "fd"), ("directional", "jvp"), ("directional", "fd"),
                                         ("directional", "per_example")])
def test_hypergradient_matches_finite_differences_in_phi(bilevel, engine, mode):
    grad = _engine_grad(bilevel, engine=engine, mode=mode, fd_eps=1e-4)
    assert grad.abs().sum() > 0  # the net receives a gradient
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        u = torch.randn(grad.numel(), generator=g, dtype=torch.float64)
        u = u / u.norm()
        fd = _fd_hypergradient(bilevel, u)
        assert abs(fd) > 1e-4
        torch.testing.assert_close((grad @ u).item(), fd, rtol=5e-4, atol=1e-7)


def test_engines_agree(bilevel):
    a = _engine_grad(bilevel, engine="autograd")
    j = _engine_grad(bilevel, engine="directional", mode="jvp")
    f = _engine_grad(bilevel, engine="directional", mode="fd", fd_eps=1e-4)
    # float32 RMSNorm inside the float64 model bounds the agreement (see _fd_hypergradient)
    torch.testing.assert_close(a, j, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(a, f, rtol=1e-3, atol=1e-7)
    p = _engine_grad(bilevel, engine="directional", mode="per_example")
    torch.testing.assert_close(a, p, rtol=1e-5, atol=1e-9)
    # micro-batching the directional engine changes nothing
    torch.testing.assert_close(j, _engine_grad(bilevel, engine="directional", mode="jvp", micro_batch_size=1))


def test_first_order_is_the_same_formula_with_v_at_theta(bilevel):
    a = _engine_grad(bilevel, engine="autograd", first_order=True)
    d = _engine_grad(bilevel, engine="directional", mode="jvp", first_order=True)
    torch.testing.assert_close(a, d, rtol=1e-5, atol=1e-9)
    e = _engine_grad(bilevel, engine="directional", mode="per_example", first_order=True)
    torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-9)
    exact = _engine_grad(bilevel, engine="autograd")
    assert not torch.allclose(a, exact)  # an approximation, not the exact meta-gradient


def test_virtual_step_equals_manual_sgd_on_a_copy(bilevel):
    import copy

    model, params, inner, *_ = bilevel
    loss = per_example_nll(model, inner, params).mean()
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    stepped = virtual_step(params, grads, 0.1)
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    per_example_nll(twin, inner).mean().backward()
    opt.step()
    for n, p in twin.named_parameters():
        torch.testing.assert_close(stepped[n], p.detach())
    assert all(torch.equal(params[n], q) for n, q in model.named_parameters())  # the module is untouched


def test_net_output_on_simplex_and_preference_algebra():
    net = PreferenceWeightNet(5, 3, 16)
    w = net(torch.randn(7, 5), torch.full((7, 3), 1 / 3))
    assert w.shape == (7, 3) and (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(7))
    w_star = torch.tensor([[0.2, 0.3, 0.5]])
    w_phi = torch.tensor([[0.6, 0.2, 0.2]])
    torch.testing.assert_close(dynamic_preference(w_star, w_phi, 0.5), torch.tensor([[0.4, 0.25, 0.35]]))
    assert dynamic_preference(w_star, w_phi, 1.0) is w_star
    r = torch.tensor([[0.0, 0.0, 0.0]])
    torch.testing.assert_close(achieved_preference(r, 1.0), torch.full((1, 3), 1 / 3))
    # tau -> 0 puts all weight on the best objective
    assert achieved_preference(torch.tensor([[1.0, 2.0, 0.0]]), 0.01).argmax().item() == 1
    assert label_preference(w_star, w_phi, 1.0) is w_star


def test_sample_weights_by_hand():
    """R = 0 -> sigmoid = 1/2 -> c^ = 1/2 for all -> normalised 1 -> c = 1. Otherwise mean 1."""
    w = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    torch.testing.assert_close(sample_weights(w, torch.zeros(2, 2), 0.3), torch.ones(2))
    r = torch.tensor([[2.0, -2.0], [-2.0, 2.0]])
    c = sample_weights(w, r, 0.5)
    torch.testing.assert_close(c.mean(), torch.tensor(1.0))
    c_hat = (w * torch.sigmoid(r)).sum(-1)
    torch.testing.assert_close(c, 0.5 + 0.5 * c_hat / c_hat.mean())
    torch.testing.assert_close(sample_weights(w, r, 1.0), torch.ones(2))


def test_higher_reference_on_a_plain_module():
    """On a plain nn.Module, `higher` differentiates through the same SGD step: same meta-gradient."""
    higher = pytest.importorskip("higher")
    torch.manual_seed(0)
    f = torch.nn.Linear(3, 1).double()
    net = PreferenceWeightNet(4, 2, 8).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    xm, ym = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    emb, w_star = torch.randn(5, 4, dtype=torch.float64), torch.full((5, 2), 0.5, dtype=torch.float64)
    rewards = torch.randn(5, 2, dtype=torch.float64)

    def c_fn():
        return sample_weights(net(emb, w_star), rewards, 0.3)

    with higher.innerloop_ctx(f, torch.optim.SGD(f.parameters(), lr=ALPHA), copy_initial_weights=True) as (fm, dopt):
        dopt.step((c_fn() * ((fm(x) - y) ** 2).squeeze(-1)).mean())
        ((fm(xm) - ym) ** 2).mean().backward()
    ref = torch.cat([p.grad.flatten() for p in net.parameters()]).clone()

    net.zero_grad()
    params = dict(f.named_parameters())
    from torch.func import functional_call

    def losses(p):
        return ((functional_call(f, p, (x,)) - y) ** 2).squeeze(-1)

    c = c_fn()
    g = torch.autograd.grad((c * losses(params)).mean(), list(params.values()), create_graph=True)
    theta_prime = virtual_step(params, dict(zip(params, g)), ALPHA)
    ((functional_call(f, theta_prime, (xm,)) - ym) ** 2).mean().backward()
    ours = torch.cat([p.grad.flatten() for p in net.parameters()])
    torch.testing.assert_close(ours, ref)


def test_lambda_one_reproduces_static_exactly(tiny_llama, tmp_path, monkeypatch):
    """Meal with lam = 1 (net built, embeddings computed) == the static method: same weights after 2 steps.
    (Validation refuses that configuration, whose net never learns; it is built here past it.)"""
    import meal.config

    real_need = meal.config._need
    monkeypatch.setattr(meal.config, "_need", lambda cond, name, msg: real_need(cond or name == "method.lam",
                                                                              name, msg))
    static = tiny_config(tiny_llama, str(tmp_path / "static"), **{"method.name": "static", "method.lam": 1.0,
                                                                     "method.meta_learner": False})
    meal1 = tiny_config(tiny_llama, str(tmp_path / "meal1"), **{"method.name": "meal", "method.lam": 1.0,
                                                                   "method.meta_learner": True})
    train(static)
    train(meal1)
    a = load_file(os.path.join(tmp_path, "static", "checkpoints", "step_000002", "policy.safetensors"))
    b = load_file(os.path.join(tmp_path, "meal1", "checkpoints", "step_000002", "policy.safetensors"))
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)
    # and lam < 1 does differ (the test could fail)
    train(tiny_config(tiny_llama, str(tmp_path / "meal"), **{"method.lam": 0.3}))
    c = load_file(os.path.join(tmp_path, "meal", "checkpoints", "step_000002", "policy.safetensors"))
    assert any(not torch.equal(a[n], c[n]) for n in a)
