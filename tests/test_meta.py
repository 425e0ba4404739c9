"""The meta-learner: hypergradients against finite differences, the two engines, lam = 1 == static."""

import os

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config

from meal.methods import train
from meal.methods.bilevel import (InnerLoss, MetaGradSettings, PreferenceWeightNet, PromptFeatures, achieved_preference,
                                  adam_preconditioner, dynamic_preference, label_preference, meta_gradient,
                                  sample_weights, virtual_step)
from meal.policy.losses import SFTBatch, build_batch, per_example_nll

ALPHA = 0.5


@pytest.fixture(scope="module")
def bilevel(tiny_llama):
    """A float64 tiny Llama (eager attention) with preference-aware LoRA (random B, so every block
    matters), an inner batch of 4 and a meta batch of 2, a net whose last layers are non-zero (so that
    every parameter receives a gradient), prompt features, targets and rewards. Built under its own seed
    (the global stream too, which LoRA's and the net's initialisations draw from), so that it never
    depends on the tests run before it."""
    seed = int(os.environ.get("MEAL_TEST_SEED", "0"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_bilevel(tiny_llama, seed)


def _build_bilevel(tiny_llama, seed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meal.policy.preference_lora import attach_preference_lora

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64, attn_implementation="eager")
    attach_preference_lora(model, 2, r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    model.to(torch.float64)  # the adapters too (kept in float32 otherwise)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, q in model.named_parameters():
            if n.endswith("pref_lora_B"):
                q.copy_(0.3 * torch.randn(q.shape, generator=g, dtype=q.dtype))
    p = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    w1 = torch.rand(4, generator=g, dtype=torch.float64)  # from the fixture's own generator, not the global one
    w_star = torch.stack([w1, 1 - w1], -1)
    inner = build_batch(tok, [p.format(q) for q in ["a", "bb", "ccc", "dddd"]],
                        ["one two", "three", "four five six", "seven"], prefs=w_star)
    meta = build_batch(tok, [p.format(q) for q in ["x", "yy"]], ["eight nine", "ten"],
                       prefs=torch.tensor([[0.3, 0.7], [0.8, 0.2]], dtype=torch.float64))
    params = {n: q for n, q in model.named_parameters() if q.requires_grad}
    net = PreferenceWeightNet(6, 2, 8).double()
    with torch.no_grad():
        for head in (net.proposal, net.relabelling):
            head[2].weight.copy_(0.5 * torch.randn(head[2].weight.shape, generator=g, dtype=torch.float64))
    z = torch.randn(4, 6, generator=g, dtype=torch.float64)
    rewards = torch.randn(4, 2, generator=g, dtype=torch.float64)
    precondition = {n: 0.5 + torch.rand(q.shape, generator=g, dtype=torch.float64) for n, q in params.items()}
    return model, params, inner, meta, net, z, w_star, rewards, precondition


PATHS = {"label": (True, False), "weight": (False, True), "both": (True, True)}


def _inner(bilevel, path="both", lam=0.5) -> InnerLoss:
    _, _, inner, _, net, z, w_star, rewards, _ = bilevel
    label_on, weight_on = PATHS[path]

    def weights():
        return sample_weights(net.propose(z, w_star), rewards, lam) if weight_on else torch.ones(4, dtype=z.dtype)

    def labels():
        if not label_on:
            return None
        return label_preference(dynamic_preference(w_star, net.propose(z, w_star), lam),
                                net.relabel(z, w_star, rewards), lam)

    return InnerLoss(inner, weights, labels)


def _meta_loss(bilevel):
    model, meta = bilevel[0], bilevel[3]
    return lambda p: per_example_nll(model, meta, p).mean()


def _engine_grad(bilevel, path="both", precondition=False, **kw):
    model, params, *_ = bilevel
    net = bilevel[4]
    settings = MetaGradSettings(ALPHA, precondition=bilevel[8] if precondition else None, **kw)
    net.zero_grad()
    meta_gradient(model, params, _inner(bilevel, path), _meta_loss(bilevel), list(net.parameters()), settings)
    return torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).flatten()
                      for q in net.parameters()]).clone()


def _meta_objective(bilevel, path="both", precondition=False) -> float:
    """L_meta(theta'(phi)) computed plainly: weights c(phi) and labels w^lab(phi), one (preconditioned)
    SGD step, the meta loss."""
    model, params = bilevel[0], bilevel[1]
    inner = _inner(bilevel, path)
    with torch.no_grad():
        c, lab = inner.weights(), inner.labels()
    batch = inner.batch if lab is None else SFTBatch(inner.batch.input_ids, inner.batch.attention_mask,
                                                     inner.batch.labels, lab)
    loss = (c * per_example_nll(model, batch, params)).mean()
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    with torch.no_grad():
        return _meta_loss(bilevel)(virtual_step(params, grads, ALPHA, bilevel[8] if precondition else None)).item()


def _fd_hypergradient(bilevel, direction: torch.Tensor, eps: float = 0.1, **kw) -> float:
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
            vals.append(_meta_objective(bilevel, **kw))
        return (vals[0] - vals[1]) / (2 * h)

    try:
        return (4 * central(eps / 2) - central(eps)) / 3
    finally:
        torch.nn.utils.vector_to_parameters(flat, net.parameters())


@pytest.mark.parametrize("path", ["label", "weight", "both"])
@pytest.mark.parametrize("engine,mode", [("autograd", "fd"), ("directional", "jvp"), ("directional", "fd"),
                                         ("directional", "per_example")])
def test_hypergradient_matches_finite_differences_in_phi(bilevel, engine, mode, path):
    """Every engine, on every path (label, sample weight, both), with the virtual step preconditioned
    by a random positive diagonal P: the meta-gradient along random directions of phi equals the
    finite difference of L_meta(theta'(phi)). The label path's derivative is a central difference
    along P v in the directional engine (fd_eps 1e-4 keeps its truncation error below the tolerance)."""
    grad = _engine_grad(bilevel, path, precondition=True, engine=engine, mode=mode, fd_eps=1e-4)
    assert grad.abs().sum() > 0  # the net receives a gradient
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        u = torch.randn(grad.numel(), generator=g, dtype=torch.float64)
        u = u / u.norm()
        fd = _fd_hypergradient(bilevel, u, path=path, precondition=True)
        assert abs(fd) > 1e-5
        torch.testing.assert_close((grad @ u).item(), fd, rtol=2e-3, atol=1e-7)


def test_label_path_reaches_both_heads_and_weight_path_only_the_proposal(bilevel):
    """The label w^lab = lam w~ + (1 - lam) h depends on the proposal (through w~) and on the relabelling
    head; the sample weight c depends on the proposal only."""
    net = bilevel[4]
    n_prop = sum(q.numel() for q in net.proposal.parameters())
    label = _engine_grad(bilevel, "label", engine="autograd")
    weight = _engine_grad(bilevel, "weight", engine="autograd")
    assert label[:n_prop].abs().sum() > 0 and label[n_prop:].abs().sum() > 0
    assert weight[:n_prop].abs().sum() > 0 and weight[n_prop:].abs().sum() == 0


def test_engines_agree(bilevel):
    a = _engine_grad(bilevel, engine="autograd")
    j = _engine_grad(bilevel, engine="directional", mode="jvp", fd_eps=1e-4)
    f = _engine_grad(bilevel, engine="directional", mode="fd", fd_eps=1e-4)
    p = _engine_grad(bilevel, engine="directional", mode="per_example", fd_eps=1e-4)
    # float32 RMSNorm inside the float64 model and the label path's central difference bound the agreement:
    # to 1e-3 of the gradient's largest entry, element by element
    tol = 1e-3 * a.abs().max().item()
    for other in (j, f, p):
        torch.testing.assert_close(other, a, rtol=1e-3, atol=tol)
        assert torch.nn.functional.cosine_similarity(other, a, dim=0) > 0.99999
    # the weight path alone needs no central difference: exact up to floating point
    torch.testing.assert_close(_engine_grad(bilevel, "weight", engine="autograd"),
                               _engine_grad(bilevel, "weight", engine="directional", mode="jvp"), rtol=1e-5, atol=1e-9)
    # micro-batching the directional engine changes nothing
    torch.testing.assert_close(j, _engine_grad(bilevel, engine="directional", mode="jvp", fd_eps=1e-4,
                                               micro_batch_size=1))


ENGINES = {"autograd": {"engine": "autograd"}, "autograd_first_order": {"engine": "autograd", "first_order": True},
           "per_example": {"engine": "directional", "mode": "per_example"},
           "per_example_first_order": {"engine": "directional", "mode": "per_example", "first_order": True},
           "jvp": {"engine": "directional", "mode": "jvp"}, "fd": {"engine": "directional", "mode": "fd"},
           "autograd_P": {"engine": "autograd", "precondition": True},  # a diagonal P in the virtual step
           "per_example_P": {"engine": "directional", "mode": "per_example", "precondition": True}}


def _shared_meta_gradients(rank, world, tiny_llama, port, out):
    """One process of :func:`test_every_engine_on_two_processes_gives_the_single_process_meta_gradient`:
    its half of the inner batch (2 of 4 rows) and of the meta batch (1 of 2), each engine's meta-gradient
    averaged over the processes (rank 0 saves them)."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from meal.harness.distributed import Dist

    dist = Dist()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bilevel = _build_bilevel(tiny_llama, 0)
    model, params, inner, meta, net, z, w_star, rewards, precondition = bilevel
    rows, meta_rows = slice(2 * rank, 2 * rank + 2), slice(rank, rank + 1)
    lam = 0.5

    def weights():  # the weight path: c's mean over every process's rows, its gradient reaching each one's phi
        return sample_weights(net.propose(z[rows], w_star[rows]), rewards[rows], lam, total=dist.sum_autograd)

    def labels():
        return label_preference(dynamic_preference(w_star[rows], net.propose(z[rows], w_star[rows]), lam),
                                net.relabel(z[rows], w_star[rows], rewards[rows]), lam)

    mine = InnerLoss(inner.slice(rows), weights, labels)
    meta_share = meta.slice(meta_rows)
    results = {}
    for name, kw in ENGINES.items():
        kw = dict(kw)
        pre = kw.pop("precondition", False)
        settings = MetaGradSettings(ALPHA, precondition=precondition if pre else None, fd_eps=1e-4,
                                    micro_batch_size=2, sum_over_processes=dist.sum_, processes=world, **kw)
        net.zero_grad()
        meta_gradient(model, params, mine, lambda p: per_example_nll(model, meta_share, p).sum() / 2,
                      list(net.parameters()), settings)
        dist.average_grads(list(net.parameters()))
        results[name] = torch.cat([q.grad.flatten() for q in net.parameters()]).clone()
    if rank == 0:
        torch.save(results, out)
    dist.barrier()  # neither process leaves the group while the other still works in it
    torch.distributed.destroy_process_group()


@pytest.mark.processes
def test_every_engine_on_two_processes_gives_the_single_process_meta_gradient(tiny_llama, tmp_path):
    """Meal's meta step under data parallelism (two gloo processes, each an equal share of the inner and of
    the meta batch): the virtual step takes the global inner gradient, v is the global meta loss's, the
    weight path's normalisation is the whole batch's (a differentiable all-reduce), and the averaged
    meta-gradient is the single process's, for every engine, mode and preconditioner (the label and the
    weight path both on)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "grads.pt"
    mp.spawn(_shared_meta_gradients, args=(2, tiny_llama, port, str(out)), nprocs=2, join=True)
    results = torch.load(out)
    assert sorted(results) == sorted(ENGINES)
    with torch.random.fork_rng(devices=[]):  # the processes' bilevel problem, whole, in this one
        torch.manual_seed(0)
        bilevel = _build_bilevel(tiny_llama, 0)
    for name, two in results.items():
        # micro-batches of 2 rows, as each process's: the same padded batches in every forward pass
        one = _engine_grad(bilevel, fd_eps=1e-4, micro_batch_size=2, **ENGINES[name])
        assert one.abs().sum() > 0, name
        # measured: every engine within 1e-15 of the largest entry since Dist.sum_ keeps float64 (summed in float32
        # before, the label path's central differences turned that rounding into ~3e-5); the bounds were set then
        tol = (1e-6 if name.startswith("autograd") else 1e-4) * one.abs().max().item()
        torch.testing.assert_close(two, one, rtol=0, atol=tol, msg=lambda m: f"{name}: {m}")


def test_first_order_is_the_same_formula_with_v_at_theta(bilevel):
    a = _engine_grad(bilevel, "weight", engine="autograd", first_order=True)
    d = _engine_grad(bilevel, "weight", engine="directional", mode="jvp", first_order=True)
    torch.testing.assert_close(a, d, rtol=1e-5, atol=1e-9)
    e = _engine_grad(bilevel, "weight", engine="directional", mode="per_example", first_order=True)
    torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-9)
    exact = _engine_grad(bilevel, "weight", engine="autograd")
    assert not torch.allclose(a, exact)  # an approximation, not the exact meta-gradient


def test_virtual_step_equals_manual_sgd_on_a_copy(bilevel):
    import copy

    model, params, inner, *_ = bilevel  # the trainable (adapter) parameters
    loss = per_example_nll(model, inner, params).mean()
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    stepped = virtual_step(params, grads, 0.1)
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    per_example_nll(twin, inner).mean().backward()
    opt.step()
    twin_params = dict(twin.named_parameters())
    for n in stepped:
        torch.testing.assert_close(stepped[n], twin_params[n].detach())
    assert not torch.equal(stepped[n], params[n])
    assert all(torch.equal(params[n], q) for n, q in model.named_parameters() if n in params)  # module untouched


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


def test_untrained_net_is_the_static_rule():
    """Both heads start as their residual base (last layer zero): w_phi = w* (up to the floor that keeps
    log 0 finite) and h = softmax(R / tau), so an untrained net is the static method with hindsight labels."""
    net = PreferenceWeightNet(5, 2, 16, tau=0.5)
    z, r = torch.randn(6, 5), torch.randn(6, 2)
    w_star = torch.tensor([[0.0, 1.0], [0.1, 0.9], [0.5, 0.5], [0.7, 0.3], [1.0, 0.0], [0.25, 0.75]])
    torch.testing.assert_close(net.propose(z, w_star), w_star, rtol=0, atol=1e-5)
    torch.testing.assert_close(net.relabel(z, w_star, r), torch.softmax(r / 0.5, -1))
    with torch.no_grad():  # a trained net moves away from both, per prompt
        net.proposal[2].weight.normal_()
    assert not torch.allclose(net.propose(z, w_star), w_star, atol=1e-3)


def test_prompt_features_are_centred_whitened_and_capped():
    """Embeddings sharing one large common direction (as the policy's do) become centred features of unit
    variance per kept direction; d is capped at M - 1."""
    g = torch.Generator().manual_seed(0)
    common = torch.randn(16, generator=g)
    emb = 10 * common + 0.1 * torch.randn(40, 16, generator=g)  # (40, 16), mean cosine to the centroid ~1
    f = PromptFeatures.fit(emb, 8)
    z = f(emb)
    assert z.shape == (40, 8) and f.dims == 8
    torch.testing.assert_close(z.mean(0), torch.zeros(8), rtol=0, atol=1e-4)
    torch.testing.assert_close(z.std(0), torch.ones(8), rtol=0, atol=1e-4)
    assert PromptFeatures.fit(emb[:5], 32).dims == 4


def test_adam_preconditioner_by_hand():
    """P is the scale of AdamW's next step with the gradient g: before its first step 1 / (|g| + eps);
    after it, 1 / (sqrt((beta2 v + (1 - beta2) g^2) / (1 - beta2^2)) + eps) from the optimiser's own v."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    g = {"p": torch.tensor([0.5, -0.1, 0.0])}
    opt = torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.99), eps=1e-6)
    torch.testing.assert_close(adam_preconditioner(opt, {"p": p}, g)["p"], 1 / (g["p"].abs() + 1e-6))
    p.grad = torch.tensor([0.2, 0.4, -0.6])
    opt.step()
    v = 0.01 * p.grad ** 2  # (1 - beta2) g^2 after one step
    v_next = 0.99 * v + 0.01 * g["p"] ** 2
    expected = 1 / ((v_next / (1 - 0.99 ** 2)).sqrt() + 1e-6)
    torch.testing.assert_close(adam_preconditioner(opt, {"p": p}, g)["p"], expected)


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
    with torch.no_grad():
        net.proposal[2].weight.normal_()  # past its initialisation, so that every layer receives a gradient
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    xm, ym = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    emb, w_star = torch.randn(5, 4, dtype=torch.float64), torch.full((5, 2), 0.5, dtype=torch.float64)
    rewards = torch.randn(5, 2, dtype=torch.float64)

    def c_fn():
        return sample_weights(net(emb, w_star), rewards, 0.3)

    with higher.innerloop_ctx(f, torch.optim.SGD(f.parameters(), lr=ALPHA), copy_initial_weights=True) as (fm, dopt):
        dopt.step((c_fn() * ((fm(x) - y) ** 2).squeeze(-1)).mean())
        ((fm(xm) - ym) ** 2).mean().backward()
    ref = torch.cat([p.grad.flatten() for p in net.proposal.parameters()]).clone()

    net.zero_grad()
    params = dict(f.named_parameters())
    from torch.func import functional_call

    def losses(p):
        return ((functional_call(f, p, (x,)) - y) ** 2).squeeze(-1)

    c = c_fn()
    g = torch.autograd.grad((c * losses(params)).mean(), list(params.values()), create_graph=True)
    theta_prime = virtual_step(params, dict(zip(params, g)), ALPHA)
    ((functional_call(f, theta_prime, (xm,)) - ym) ** 2).mean().backward()
    ours = torch.cat([p.grad.flatten() for p in net.proposal.parameters()])
    torch.testing.assert_close(ours, ref)


def test_lambda_one_reproduces_static_exactly(tiny_llama, tmp_path, monkeypatch):
    """Meal with lam = 1 (net built, embeddings computed) == the static method: same weights after 2 steps.
    (Validation refuses that configuration, whose net never learns; it is built here past it.)"""
    import meal.methods.meal as recipe

    real_need = recipe.need
    monkeypatch.setattr(recipe, "need", lambda cond, name, msg: real_need(cond or name == "method.lam", name, msg))
    lora = {"policy.lora": {"enabled": True, "preference_aware": True, "r": 2, "alpha": 4}}
    static = tiny_config(tiny_llama, str(tmp_path / "static"), **{"method.name": "static", "method.lam": 1.0,
                                                                     "method.meta_learner": False}, **lora)
    meal1 = tiny_config(tiny_llama, str(tmp_path / "meal1"), **{"method.name": "meal", "method.lam": 1.0,
                                                                   "method.meta_learner": True}, **lora)
    train(static)
    train(meal1)
    a = load_file(os.path.join(tmp_path, "static", "checkpoints", "step_000002", "policy.safetensors"))
    b = load_file(os.path.join(tmp_path, "meal1", "checkpoints", "step_000002", "policy.safetensors"))
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)
    # and lam < 1 does differ (the test could fail)
    train(tiny_config(tiny_llama, str(tmp_path / "meal"), **{"method.lam": 0.3}, **lora))
    c = load_file(os.path.join(tmp_path, "meal", "checkpoints", "step_000002", "policy.safetensors"))
    assert any(not torch.equal(a[n], c[n]) for n in a)
