"""Tests for losses.py: the paper's formulas (Table 1, Eq. 10, Table 2), plain-autograd gradients, numerics, errors, compile, ELR."""

from __future__ import annotations

import ast
import functools
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import losses
from losses import METHODS, build_loss, global_trust, local_trust, proselflc_epsilon

PAPER_METHODS = ("cce", "ls", "cp", "bootsoft", "boothard", "proselflc", "gce", "sce")  # the reference below

C = 5  # classes in the small float64 tests
T = 100  # total steps
TARGET_METHODS = ("cce", "ls", "cp", "bootsoft", "boothard", "proselflc")
SELF_TARGET = ("cp", "bootsoft", "proselflc")  # p inside the target: variants apply
VARIANTS = ({}, {"detach_target": True}, {"temperature": 2.0})


def _data(n: int = 6, c: int = C, seed: int = 0, dtype=torch.float64, scale: float = 2.0):
    """Random logits (leaf, requires grad), class ids and their one-hot float labels."""
    gen = torch.Generator().manual_seed(seed)
    z = (scale * torch.randn(n, c, generator=gen, dtype=dtype)).requires_grad_()
    y = torch.randint(0, c, (n,), generator=gen)
    return z, y, F.one_hot(y, c).to(dtype)


def _soft(n: int = 6, c: int = C, seed: int = 1) -> torch.Tensor:
    """Random soft labels [n, c] (rows sum to 1), mixup-style."""
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, c, generator=gen, dtype=torch.float64), 1)


def _grad(loss: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """d loss / d z (loss reduced to a scalar by summing if needed)."""
    return torch.autograd.grad(loss.sum(), z, retain_graph=True)[0]


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) per row, 0 log 0 = 0."""
    return -torch.special.xlogy(p, p).sum(1)


def _reference_target(
    method: str, z, q, step=None, eps=0.25, exp_base=10.0, transit=0.5, detach_target=False, temperature=None
):
    """q~ straight from the paper (Table 1, Eq. 10) with plain autograd ops; q dense [N, C]."""
    c = z.shape[1]
    p = torch.softmax(z, 1)
    r = p  # p inside the target carries gradient (Eq. 4-5)
    if temperature is not None:
        r = torch.softmax(z.detach() / temperature, 1)
    elif detach_target:
        r = p.detach()
    if method == "cce":
        return q
    if method == "ls":
        return (1 - eps) * q + eps * torch.full_like(q, 1.0 / c)
    if method == "cp":
        return (1 - eps) * q - eps * r
    if method == "bootsoft":
        return (1 - eps) * q + eps * r
    if method == "boothard":
        return (1 - eps) * q + eps * F.one_hot(p.argmax(1), c).to(q.dtype)
    assert method == "proselflc"
    g = 1.0 / (1.0 + math.exp(-exp_base * (step / T - transit)))
    e = (g * (1 - _entropy(r.detach()) / math.log(c))).unsqueeze(1)  # no gradient through eps
    return (1 - e) * q + e * r


def _reference_loss(method: str, z, q, step=None, q_gce=0.7, alpha=6.0, beta=0.1, reduction="mean", **kw):
    """Plain-autograd loss from the formulas; q dense [N, C]."""
    logp = torch.log_softmax(z, 1)
    p = logp.exp()
    if method == "gce":
        per = (q * (1 - p**q_gce)).sum(1) / q_gce
    elif method == "sce":
        per = alpha * -(q * logp).sum(1) + beta * -(p * torch.log(q.clamp(min=1e-4))).sum(1)
    else:
        per = -(_reference_target(method, z, q, step=step, **kw) * logp).sum(1)
    return {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]


def _fused(method: str, z, labels, trust, step=None, **hp):
    """The module's loss, but with eps_i / detached targets / argmax computed from fixed `trust` logits."""
    fn = build_loss(method, z.shape[1], total_steps=T, **hp)
    if method in ("cce", "ls", "gce", "sce"):
        return fn(z, labels, step=step)
    q = F.one_hot(labels, z.shape[1]).to(z.dtype) if labels.dim() == 1 else labels
    logp = torch.log_softmax(z, 1)
    p_fixed = torch.softmax(trust / (fn.temperature or 1.0), 1)
    r = p_fixed if fn.temperature is not None or fn.detach_target else logp.exp()
    if method == "boothard":
        r = F.one_hot(trust.argmax(1), z.shape[1]).to(z.dtype)
    eps = fn.epsilon(p_fixed, step).unsqueeze(1) if method == "proselflc" else fn.eps
    per = -(((1 - eps) * q + (-eps if method == "cp" else eps) * r) * logp).sum(1)
    return {"mean": per.mean(), "sum": per.sum(), "none": per}[fn.reduction]


def _extra(method: str, n: int = 6) -> dict:
    """What build_loss needs beyond the common arguments: ELR's number of training rows."""
    return {"num_examples": n} if method == "elr" else {}


# ------------------------------------------------------------------------------ API
def test_methods_and_module_api():
    assert METHODS == ("cce", "ls", "cp", "bootsoft", "boothard", "proselflc", "proselflc_t", "gce", "sce", "elr")
    z, y, _ = _data()
    rows = torch.arange(6)
    for method in METHODS:
        fn = build_loss(method, C, total_steps=T, **_extra(method))
        assert isinstance(fn, torch.nn.Module)
        loss = fn(z, y, step=10, index=rows)
        assert loss.shape == () and loss.requires_grad and torch.isfinite(loss)
        if method != "elr":  # ELR's running targets move with every call
            assert torch.equal(fn(z, y, step=10), loss)  # deterministic
        per_example = build_loss(method, C, total_steps=T, reduction="none", **_extra(method))(
            z, y, step=10, index=rows
        )
        summed = build_loss(method, C, total_steps=T, reduction="sum", **_extra(method))(z, y, step=10, index=rows)
        assert per_example.shape == (6,)
        assert torch.allclose(per_example.mean(), loss, atol=1e-14)
        assert torch.allclose(per_example.sum(), summed, atol=1e-13)


def test_none_means_default_and_a_hyperparameter_the_method_does_not_use_is_refused():
    z, y, _ = _data()
    every = {k: None for k in losses.HPARAMS}
    for method in PAPER_METHODS:
        a = build_loss(method, C, total_steps=T, **every)(z, y, step=50)
        b = build_loss(method, C, total_steps=T)(z, y, step=50)
        assert torch.equal(a, b)
    for method, key, value in (
        ("cce", "eps", 0.5),
        ("cce", "temperature", 0.5),
        ("cce", "exp_base", 12.0),
        ("proselflc", "q", 0.3),
        ("cce", "elr_beta", 0.5),
        ("ls", "detach_target", True),
    ):
        with pytest.raises(ValueError, match=f"{key} is not used by {method} \\(it is used by "):
            build_loss(method, C, total_steps=T, **{key: value})
    with pytest.raises(ValueError, match="zero loss"):
        build_loss("sce", C, alpha=0.0, beta=0.0)
    assert set(losses.FIXED_EPS) == {m for m in losses.METHODS if "eps" in losses.USES[m]}


# --------------------------------------------------------------- exactness vs references
def test_cce_equals_cross_entropy_value_and_grad():
    z, y, _ = _data(dtype=torch.float32)
    soft = _soft().float()
    for reduction in ("mean", "sum", "none"):
        fn = build_loss("cce", C, reduction=reduction)
        for labels in (y, soft):
            ours, ref = fn(z, labels), F.cross_entropy(z, labels, reduction=reduction)
            assert torch.allclose(ours, ref, atol=1e-6)
            assert torch.allclose(_grad(ours, z), _grad(ref, z), atol=1e-6)


def test_ls_equals_cross_entropy_label_smoothing():
    z, y, _ = _data(dtype=torch.float32)
    soft = _soft().float()
    for eps in (0.1, 0.25, 0.5):
        for reduction in ("mean", "sum", "none"):
            fn = build_loss("ls", C, eps=eps, reduction=reduction)
            for labels in (y, soft):
                ours = fn(z, labels)
                ref = F.cross_entropy(z, labels, label_smoothing=eps, reduction=reduction)
                assert torch.allclose(ours, ref, atol=1e-6)
                assert torch.allclose(_grad(ours, z), _grad(ref, z), atol=1e-6)


def test_table1_identities_float64_value_and_grad():
    z, y, q = _data()
    logp = torch.log_softmax(z, 1)
    p = logp.exp()
    h_qp, h_up, h_pp = -(q * logp).sum(1), -logp.mean(1), -(p * logp).sum(1)  # p in H(p, p) carries grad
    eps = 0.3
    expected = {
        "ls": (1 - eps) * h_qp + eps * h_up,
        "cp": (1 - eps) * h_qp - eps * h_pp,
        "bootsoft": (1 - eps) * h_qp + eps * h_pp,
    }
    for method, ref in expected.items():
        ours = build_loss(method, C, eps=eps, reduction="none")(z, y)
        assert torch.allclose(ours, ref, atol=1e-12, rtol=0)
        assert torch.allclose(_grad(ours, z), _grad(ref, z), atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", PAPER_METHODS)
def test_fused_backward_equals_plain_autograd_reference(method):
    """Value and gradient of every method and variant, class ids and soft labels, every reduction."""
    variants = VARIANTS if method in SELF_TARGET else ({},)
    for hp in variants:
        for reduction in ("mean", "sum", "none"):
            for seed, step in ((0, 10), (1, 50), (2, 93)):
                z, y, q = _data(n=7, seed=seed, scale=3.0)
                soft = _soft(7, seed=seed)
                fn = build_loss(method, C, total_steps=T, reduction=reduction, **hp)
                for labels, dense in ((y, q), (soft, soft)):
                    ours = fn(z, labels, step=step)
                    ref = _reference_loss(method, z, dense, step=step, reduction=reduction, **hp)
                    assert torch.allclose(ours, ref, atol=1e-12, rtol=1e-12), (method, hp, reduction)
                    grad_out = torch.rand_like(ours) + 0.5  # a non-trivial upstream gradient
                    g_ours = torch.autograd.grad(ours, z, grad_out)[0]
                    g_ref = torch.autograd.grad(ref, z, grad_out)[0]
                    assert torch.allclose(g_ours, g_ref, atol=1e-12, rtol=1e-10), (method, hp, reduction)


@pytest.mark.parametrize("method", PAPER_METHODS)
def test_gradcheck_every_method(method):
    """torch.autograd.gradcheck in float64; eps_i, detached targets and argmax come from fixed logits."""
    variants = VARIANTS if method in SELF_TARGET else ({},)
    z, y, _ = _data(n=4, seed=3)
    trust = z.detach().clone()  # what the module uses, held fixed as the paper's semantics do
    for hp in variants:
        for labels in (y, _soft(4, seed=4)):
            for reduction in ("mean", "none"):

                def f(x, labels=labels, reduction=reduction, hp=hp):
                    return _fused(method, x, labels, trust, step=70, reduction=reduction, **hp)

                assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7)
                # and the module itself equals that function at trust = its own logits
                fn = build_loss(method, C, total_steps=T, reduction=reduction, **hp)
                ours, fixed = fn(z, labels, step=70), f(z)
                assert torch.allclose(ours, fixed, atol=1e-13)
                assert torch.allclose(_grad(ours, z), _grad(fixed, z), atol=1e-13)


def test_gradient_semantics_and_variants():
    """p in the target carries gradient; detached p collapses to (1 - eps)(p - q); temperature uses p_T."""
    z, y, q = _data(n=8, seed=5, scale=3.0)
    p = torch.softmax(z, 1).detach()
    g_live = _grad(build_loss("bootsoft", C, eps=0.4)(z, y), z)
    g_det = _grad(build_loss("bootsoft", C, eps=0.4, detach_target=True)(z, y), z)
    assert torch.allclose(g_det, 0.6 * (p - q) / 8, atol=1e-14)
    assert not torch.allclose(g_live, g_det, atol=1e-4)
    fn = build_loss("proselflc", C, total_steps=T, detach_target=True)
    g = _grad(fn(z, y, step=80), z)
    e = fn.last_epsilon.unsqueeze(1)
    assert torch.allclose(g, (1 - e) * (p - q) / 8, atol=1e-14)
    # temperature: eps_i = g(t) l(p_T) with p_T = softmax(z / T0)
    fn = build_loss("proselflc", C, total_steps=T, temperature=3.0)
    fn(z, y, step=80)
    p_t = torch.softmax(z.detach() / 3.0, 1)
    assert torch.allclose(fn.last_epsilon, global_trust(80, T) * local_trust(p_t), atol=1e-14)
    # boothard's argmax carries no gradient: (1 - eps)(p - q) + eps (p - onehot(argmax p))
    g = _grad(build_loss("boothard", C, eps=0.4)(z, y), z)
    hard = F.one_hot(p.argmax(1), C).double()
    assert torch.allclose(g, (0.6 * (p - q) + 0.4 * (p - hard)) / 8, atol=1e-14)


def test_boothard_ties_take_the_first_argmax():
    """Tied maxima: the hard target is the first of them, like Tensor.argmax."""
    z = torch.tensor(
        [[2.0, 5.0, 5.0, 1.0], [3.0, 3.0, 3.0, 3.0], [0.0, 1.0, 2.0, 7.0], [7.0, 1.0, 2.0, 7.0]],
        dtype=torch.float64,
        requires_grad=True,
    )
    y = torch.tensor([0, 3, 1, 2])
    assert torch.equal(z.detach().argmax(1), torch.tensor([1, 0, 3, 0]))
    for dtype in (torch.float64, torch.float32):
        x = z.detach().to(dtype).requires_grad_()
        g = _grad(build_loss("boothard", 4, eps=0.4)(x, y), x).double()
        p, q = torch.softmax(z, 1).detach(), F.one_hot(y, 4).double()
        hard = F.one_hot(z.detach().argmax(1), 4).double()
        assert torch.allclose(g, (0.6 * (p - q) + 0.4 * (p - hard)) / 4, atol=1e-7)


def test_soft_one_hot_labels_equal_class_ids():
    z, y, q = _data(n=8, seed=6)
    for method in METHODS:
        for reduction in ("mean", "none"):
            fn = build_loss(method, C, total_steps=T, reduction=reduction, **_extra(method, 8))
            state = {k: v.clone() for k, v in fn.state_dict().items()}  # ELR: both calls start from the same targets
            a = fn(z, y, step=60, index=torch.arange(8))
            fn.load_state_dict(state)
            b = fn(z, q, step=60, index=torch.arange(8))
            assert torch.allclose(a, b, atol=1e-12), method
            assert torch.allclose(_grad(a, z), _grad(b, z), atol=1e-12), method


def test_target_method_matches_formula():
    z, y, q = _data(n=6, seed=7)
    for method in TARGET_METHODS:
        for hp in VARIANTS if method in SELF_TARGET else ({},):
            fn = build_loss(method, C, total_steps=T, **({"eps": 0.3} if method in losses.FIXED_EPS else {}), **hp)
            got = fn.target(z, y, step=40)
            want = _reference_target(method, z, q, step=40, eps=0.3, **hp)
            assert got.shape == (6, C)
            assert torch.allclose(got, want, atol=1e-14), (method, hp)
            total = 1 - 2 * 0.3 if method == "cp" else 1.0  # CP's target sums to 1 - 2 eps
            assert torch.allclose(got.sum(1), torch.full((6,), total, dtype=got.dtype), atol=1e-12)
    with pytest.raises(ValueError, match="gce"):
        build_loss("gce", C).target(z, y)


# ------------------------------------------------------------- Section 4.2 and Table 2
def test_worked_example_section_4_2():
    p = torch.tensor([[0.95, 0.01, 0.04]], dtype=torch.float64)
    y = torch.tensor([2])
    fn = build_loss("bootsoft", 3, eps=0.8)  # q~ = (1 - eps) q + eps p with eps = 0.8
    q_tilde = fn.target(p.log(), y)
    assert torch.allclose(q_tilde, torch.tensor([[0.76, 0.008, 0.232]], dtype=torch.float64), atol=1e-12)
    assert q_tilde.argmax(1).item() == 0  # the semantic class is corrected from 2 to 0
    # ProSelfLC builds the same convex combination with its own eps_i = g(t) l(p)
    fn = build_loss("proselflc", 3, total_steps=T)
    eps = proselflc_epsilon(p, 95, T).item()
    assert torch.allclose(fn.target(p.log(), y, step=95), (1 - eps) * F.one_hot(y, 3) + eps * p, atol=1e-12)


def _probs_with_local_trust(target: float, c: int = 10) -> torch.Tensor:
    """A row of probabilities softmax([s, 0, ..., 0]) whose l(p) = 1 - H(p)/log C equals target (bisection)."""
    lo, hi = 0.0, 50.0
    for _ in range(200):
        s = (lo + hi) / 2
        p = torch.softmax(torch.tensor([[s] + [0.0] * (c - 1)], dtype=torch.float64), 1)
        lo, hi = (s, hi) if local_trust(p).item() < target else (lo, s)
    return p


def _step_with_global_trust(target: float, exp_base: float = 10.0) -> float:
    """t such that g(t) = target: t = T (0.5 + logit(target) / exp_base)."""
    return T * (0.5 + math.log(target / (1 - target)) / exp_base)


def test_table2_products():
    expected = {(0.1, 0.1): 0.01, (0.1, 0.9): 0.09, (0.9, 0.1): 0.09, (0.9, 0.9): 0.81}
    for (g, lt), eps in expected.items():
        step, p = _step_with_global_trust(g), _probs_with_local_trust(lt)
        assert global_trust(step, T) == pytest.approx(g, abs=1e-12)
        assert local_trust(p).item() == pytest.approx(lt, abs=1e-12)
        assert proselflc_epsilon(p, step, T).item() == pytest.approx(eps, abs=1e-12)
        fn = build_loss("proselflc", 10, total_steps=T)
        fn(p.log(), torch.tensor([0]), step=step)
        assert fn.last_epsilon.item() == pytest.approx(eps, abs=1e-12)
    # confident + inconsistent in the later phase: eps 0.81 > 0.5 corrects the semantic class
    p, step = _probs_with_local_trust(0.9), _step_with_global_trust(0.9)
    q_tilde = build_loss("proselflc", 10, total_steps=T).target(p.log(), torch.tensor([3]), step=step)
    assert q_tilde.argmax(1).item() == 0
    # ... but not in the earlier phase (eps 0.09): the annotation dominates
    q_tilde = build_loss("proselflc", 10, total_steps=T).target(p.log(), torch.tensor([3]), step=T - step)
    assert q_tilde.argmax(1).item() == 3


def test_global_trust_below_half_before_transit_above_after():
    for exp_base in (8.0, 10.0, 14.0):
        gs = [global_trust(t, 1000, exp_base) for t in range(0, 1001, 10)]
        assert all(b > a for a, b in zip(gs, gs[1:]))  # grows with t
        assert all(g < 0.5 for g in gs[:50]) and all(g > 0.5 for g in gs[51:])
        assert global_trust(500, 1000, exp_base) == pytest.approx(0.5)
        assert 0.0 < gs[0] and gs[-1] < 1.0
    assert global_trust(700, 1000, 10.0, transit=0.7) == pytest.approx(0.5)
    assert global_trust(10**6, 10**6, exp_base=1e4) == 1.0  # no overflow at extreme exp_base
    assert global_trust(0, 10**6, exp_base=1e4) == 0.0


def test_proselflc_epsilon_and_last_epsilon():
    z, y, _ = _data(n=8, seed=8, scale=3.0)
    fn = build_loss("proselflc", C, total_steps=T)
    fn(z, y, step=75)
    eps = fn.last_epsilon
    assert eps.shape == (8,) and not eps.requires_grad and eps.grad_fn is None
    assert ((eps >= 0) & (eps <= 1)).all()
    p = torch.softmax(z, 1)
    assert torch.allclose(eps, global_trust(75, T) * (1 - _entropy(p.detach()) / math.log(C)), atol=1e-14)
    assert torch.allclose(proselflc_epsilon(p, 75, T), eps, atol=1e-14)
    assert not proselflc_epsilon(p, 75, T).requires_grad
    # a 0-dim tensor step gives the same value, gradient and eps as the int step
    loss_int, loss_t = fn(z, y, step=75), fn(z, y, step=torch.tensor(75))
    assert torch.allclose(loss_int, loss_t, atol=1e-12)
    assert torch.allclose(_grad(loss_int, z), _grad(loss_t, z), atol=1e-12)
    assert torch.allclose(fn.last_epsilon, eps, atol=1e-7)
    # an accelerator step stays a tensor (no host sync): g(t) is then a 0-dim tensor
    g_t = global_trust(torch.tensor(75), T)
    assert isinstance(g_t, torch.Tensor) and g_t.item() == pytest.approx(global_trust(75, T), rel=1e-6)
    assert torch.allclose(proselflc_epsilon(p, torch.tensor(75), T), eps, atol=1e-7)
    assert build_loss("bootsoft", C, eps=0.3).last_epsilon == 0.3
    for method in ("cce", "gce", "sce"):
        fn = build_loss(method, C)
        fn(z, y)
        assert fn.last_epsilon == 0.0


# ------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32))
def test_finite_for_extreme_logits_in_every_dtype(dtype):
    z = torch.tensor(
        [
            [1e4, -1e4, 0.0, 5.0, -3.0],
            [-1e4, 1e4, 1e4, -1e4, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0],
            [-1e4, -1e4, -1e4, -1e4, 1e4],
        ],
        dtype=dtype,
    )
    y = torch.tensor([1, 0, 2, 4])
    for method in PAPER_METHODS:
        for hp in VARIANTS if method in SELF_TARGET else ({},):
            z_leaf = z.clone().requires_grad_()
            fn = build_loss(method, C, total_steps=T, **hp)
            loss = fn(z_leaf, y, step=90)
            grad = _grad(loss, z_leaf)
            assert loss.dtype == torch.float32 and torch.isfinite(loss), (method, hp)
            assert grad.dtype == dtype and torch.isfinite(grad).all(), (method, hp)
            ref = _reference_loss(method, z.double(), F.one_hot(y, C).double(), step=90, **hp)
            assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-5), (method, hp)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_finite_under_autocast(dtype):
    torch.manual_seed(0)
    model = torch.nn.Linear(16, C)
    x, y = 30 * torch.randn(32, 16), torch.randint(0, C, (32,))
    for method in METHODS:
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            logits = model(x)
            loss = build_loss(method, C, total_steps=T, **_extra(method, 32))(
                logits, y, step=60, index=torch.arange(32)
            )
        assert logits.dtype == dtype and loss.dtype == torch.float32
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(model.weight.grad).all(), method


def test_copied_alone_runs_every_method(tmp_path: Path):
    """losses.py needs nothing but torch and the standard library."""
    shutil.copy(Path(losses.__file__), tmp_path / "losses.py")
    script = textwrap.dedent("""
        import torch
        from losses import METHODS, build_loss
        z, y = torch.randn(8, 10, requires_grad=True), torch.randint(0, 10, (8,))
        for method in METHODS:
            fn = build_loss(method, 10, total_steps=100, num_examples=8 if method == "elr" else None)
            loss = fn(z, y, step=50, index=torch.arange(8))
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
            print(method, round(loss.item(), 4))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing but the copy is importable
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert [line.split()[0] for line in out.stdout.splitlines()] == list(METHODS)


def test_imports_only_torch_and_the_standard_library():
    tree = ast.parse(Path(losses.__file__).read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    roots = {name.split(".")[0] for name in names}
    assert roots - {"torch", "__future__"} <= set(sys.stdlib_module_names), roots


def test_no_grad_forward_and_backward_modes():
    z, y, _ = _data(n=6, seed=9)
    for method in PAPER_METHODS:
        fn = build_loss(method, C, total_steps=T)
        with torch.no_grad():
            value = fn(z, y, step=30)
        assert torch.allclose(value, fn(z, y, step=30), atol=1e-14)
        with torch.enable_grad():  # backward inside an enable_grad block is an ordinary backward
            fn(z, y, step=30).backward()
        assert torch.isfinite(z.grad).all()
        z.grad = None
        # plain autograd: double backward works (the former fused autograd.Functions refused it)
        grad = torch.autograd.grad(fn(z, y, step=30), z, create_graph=True)[0]
        assert grad.requires_grad and torch.isfinite(torch.autograd.grad(grad.square().sum(), z)[0]).all()


# ----------------------------------------------------------------------------- bad input
def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown loss method 'proself'.*" + ", ".join(METHODS)):
        build_loss("proself", 10)


@pytest.mark.parametrize(
    "hp, match",
    [
        ({"eps": -0.1}, r"eps=-0\.1"),
        ({"eps": 1.5}, r"eps=1\.5"),
        ({"eps": float("nan")}, "eps=nan"),
        ({"exp_base": 0}, "exp_base=0"),
        ({"exp_base": -2.0}, r"exp_base=-2\.0"),
        ({"q": 0.0}, r"q=0\.0"),
        ({"q": 1.5}, r"q=1\.5"),
        ({"alpha": -1.0}, r"alpha=-1\.0"),
        ({"beta": -0.5}, r"beta=-0\.5"),
        ({"temperature": 0.0}, r"temperature=0\.0"),
        ({"detach_target": "yes"}, "detach_target='yes'"),
        ({"reduction": "avg"}, "reduction='avg'"),
        ({"eps": True}, "eps=True"),
        ({"epsilon": 0.1}, "unknown loss hyperparameter.*epsilon"),
        ({"trust": "max"}, "trust='max'"),
        ({"elr_beta": 1.5}, r"elr_beta=1\.5"),
        ({"elr_lambda": -1}, "elr_lambda=-1"),
    ],
)
def test_bad_hparams_raise_naming_the_value(hp, match):
    method = next((m for m in METHODS if set(hp) <= set(losses.USES[m])), "proselflc")  # one that uses it
    with pytest.raises(ValueError, match=match):
        build_loss(method, 10, total_steps=100, **hp, **_extra(method))


def test_bad_sizes_and_steps_raise():
    with pytest.raises(ValueError, match="proselflc needs total_steps"):
        build_loss("proselflc", 10)
    with pytest.raises(ValueError, match="total_steps=0"):
        build_loss("proselflc", 10, total_steps=0)
    with pytest.raises(ValueError, match="num_classes=1"):
        build_loss("cce", 1)
    fn = build_loss("proselflc", C, total_steps=T)
    z, y, _ = _data()
    for step in (-1, T + 1, torch.tensor(-1), torch.tensor(T + 5), 1e9):
        with pytest.raises(ValueError, match=rf"step=.*{int(step)}.*outside \[0, total_steps={T}\]"):
            fn(z, y, step=step)
    with pytest.raises(ValueError, match="step=nan"):
        fn(z, y, step=float("nan"))
    with pytest.raises(ValueError, match="proselflc needs step"):
        fn(z, y)
    with pytest.raises(ValueError, match="0-dim"):
        fn(z, y, step=torch.tensor([3, 4]))
    for bad in (-1, T + 1):
        with pytest.raises(ValueError, match=f"step={bad}"):
            global_trust(bad, T)
    with pytest.raises(ValueError, match="exp_base=0"):
        global_trust(3, T, exp_base=0)
    with pytest.raises(ValueError, match="total_steps=None"):
        proselflc_epsilon(torch.softmax(z, 1), 3, None)


def test_bad_logits_and_labels_raise():
    z, y, q = _data()
    for method in METHODS:
        fn = build_loss(method, C, total_steps=T, **_extra(method))
        fn = functools.partial(fn, index=torch.arange(6))  # ELR's rows; the other methods ignore them
        with pytest.raises(ValueError, match=rf"class id {C} is out of range \[0, {C}\)"):
            fn(z, torch.tensor([0, 1, 2, 3, 4, C]), step=1)
        with pytest.raises(ValueError, match=r"class id -1 is out of range"):
            fn(z, torch.tensor([0, 1, -1, 3, 4, 0]), step=1)
        with pytest.raises(ValueError, match="labels have 5 entries for 6 rows"):
            fn(z, y[:5], step=1)
        with pytest.raises(ValueError, match=r"soft labels must have shape \(6, 5\).*\(6, 4\)"):
            fn(z, q[:, :4], step=1)
        with pytest.raises(ValueError, match=r"integer class ids \[N\] or floating soft labels.*torch.float64"):
            fn(z, y.double(), step=1)
        with pytest.raises(ValueError, match="torch.bool"):
            fn(z, y > 2, step=1)
        with pytest.raises(ValueError, match=r"shape \(6, 5, 1\)"):
            fn(z, q.unsqueeze(2), step=1)
        with pytest.raises(ValueError, match=r"logits must have shape \[N, 5\], got \(6, 4\)"):
            fn(z[:, :4], y, step=1)
        with pytest.raises(ValueError, match=r"logits must have shape \[N, 5\], got \(6,\)"):
            fn(z[:, 0], y, step=1)
        with pytest.raises(ValueError, match="floating-point"):
            fn(y.view(6, 1).expand(6, C), y, step=1)
        assert torch.isfinite(fn(z, y.int(), step=1))  # other integer dtypes are fine


# ------------------------------------------------------------------- torch.compile, later variant, ELR
@pytest.mark.parametrize("method", METHODS)
def test_compiles_fullgraph_equal_to_eager(method):
    """torch.compile(fullgraph=True): no graph break, the same loss, gradient, eps and running targets; a new step recompiles at most once."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    z, y, _ = _data(n=4, dtype=torch.float32)
    rows = torch.tensor([0, 2, 3, 5])
    eager = build_loss(method, C, total_steps=T, **_extra(method))
    compiled = build_loss(method, C, total_steps=T, **_extra(method))
    fn = torch.compile(compiled, fullgraph=True, backend=os.environ.get("LOSSES_COMPILE_BACKEND", "aot_eager"))
    for step in (10, 11, 12):
        want, got = eager(z, y, step=step, index=rows), fn(z, y, step=step, index=rows)
        assert torch.allclose(got, want, atol=1e-6), (method, step)
        grads = [torch.autograd.grad(loss, z)[0] for loss in (got, want)]  # no retain_graph: inductor donates buffers
        assert torch.allclose(*grads, atol=1e-6), (method, step)
    assert torch.allclose(torch.as_tensor(compiled.last_epsilon), torch.as_tensor(eager.last_epsilon), atol=1e-6)
    if method == "elr":
        assert (
            torch.allclose(compiled.elr_targets, eager.elr_targets, atol=1e-6) and compiled.elr_targets.abs().sum() > 0
        )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # step 11 makes the int step dynamic, no more


def test_later_variant_eps_and_target_by_hand():
    """proselflc_t: p_T = softmax(z / 0.5), eps = g(t) max_k p_T, q~ = (1 - eps) q + eps p_T, no gradient through q~."""
    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 2])
    fn = build_loss("proselflc_t", 3, total_steps=100)  # T0 0.5, trust maxp, exp_base 10, transit 0.5
    assert (fn.temperature, fn.trust) == (0.5, "maxp")
    g = 1 / (1 + math.exp(-10 * (80 / 100 - 0.5)))
    rows = [[math.exp(v / 0.5) for v in row] for row in ([2.0, 0.0, -1.0], [0.5, 1.0, 0.0])]
    p_t = [[e / sum(row) for e in row] for row in rows]
    eps = [g * max(row) for row in p_t]
    q_tilde = [[(1 - e) * (k == label) + e * pk for k, pk in enumerate(row)] for e, row, label in zip(eps, p_t, (1, 2))]
    assert torch.allclose(fn.target(z, y, step=80), torch.tensor(q_tilde, dtype=torch.float64), atol=1e-12)
    loss = fn(z, y, step=80)
    assert torch.allclose(fn.last_epsilon, torch.tensor(eps, dtype=torch.float64), atol=1e-12)
    # the target is a constant: dH(q~, p)/dz = (p - q~) / N
    p = torch.softmax(z, 1).detach()
    assert torch.allclose(_grad(loss, z), (p - torch.tensor(q_tilde, dtype=torch.float64)) / 2, atol=1e-12)
    # the same variant through proselflc's flags, and trust="entropy" keeps Eq. 10's l(p)
    same = build_loss("proselflc", 3, total_steps=100, temperature=0.5, trust="maxp")
    assert torch.allclose(same(z, y, step=80), loss, atol=1e-14)
    ent = build_loss("proselflc_t", 3, total_steps=100, trust="entropy")
    ent(z, y, step=80)
    assert torch.allclose(ent.last_epsilon, g * local_trust(torch.tensor(p_t, dtype=torch.float64)), atol=1e-12)


def test_elr_loss_and_running_targets_over_three_steps_by_hand():
    """ELR: t_i <- beta t_i + (1 - beta) p^_i / sum p^_i, then CE + lambda log(1 - <t_i, p_i>), p clamped to [1e-4, 1 - 1e-4]."""
    beta, lam = 0.7, 3.0
    fn = build_loss("elr", 3, num_examples=4, elr_beta=beta, elr_lambda=lam).double()
    assert fn.elr_targets.shape == (4, 3) and not fn.elr_targets.any()
    targets = [[0.0] * 3 for _ in range(4)]
    batches = [
        ([[1.0, 0.0, -1.0], [0.0, 3.0, 0.5]], [0, 1], [0, 2]),
        ([[0.2, 0.1, 12.0], [2.0, 2.0, 0.0]], [2, 0], [2, 0]),  # p of row 2 hits the clamp
        ([[0.5, -0.5, 1.5], [-1.0, 0.0, 1.0]], [0, 1], [0, 3]),
    ]
    for logits, labels, index in batches:
        per_example = []
        for row, label, i in zip(logits, labels, index):
            e = [math.exp(v - max(row)) for v in row]
            p = [min(max(v / sum(e), 1e-4), 1 - 1e-4) for v in e]
            targets[i] = [beta * t + (1 - beta) * pk / sum(p) for t, pk in zip(targets[i], p)]
            ce = -math.log(e[label] / sum(e))
            per_example.append(ce + lam * math.log(1 - sum(t * pk for t, pk in zip(targets[i], p))))
        loss = fn(torch.tensor(logits, dtype=torch.float64), torch.tensor(labels), step=0, index=torch.tensor(index))
        assert loss.item() == pytest.approx(sum(per_example) / 2, abs=1e-12)
        assert torch.allclose(fn.elr_targets, torch.tensor(targets, dtype=torch.float64), atol=1e-12)
    assert fn.elr_targets.sum(1).tolist() == pytest.approx([1 - beta**3, 0.0, 1 - beta**2, 1 - beta])  # updates per row
    # defaults by number of classes; ELR needs its rows
    assert (build_loss("elr", 10, num_examples=1).elr_beta, build_loss("elr", 10, num_examples=1).elr_lambda) == (
        0.7,
        3.0,
    )
    assert (build_loss("elr", 100, num_examples=1).elr_beta, build_loss("elr", 100, num_examples=1).elr_lambda) == (
        0.9,
        7.0,
    )
    assert (build_loss("sce", 10).alpha, build_loss("sce", 10).beta, build_loss("sce", 12).alpha) == (0.1, 1.0, 6.0)
    with pytest.raises(ValueError, match="elr needs num_examples"):
        build_loss("elr", 3)
    with pytest.raises(ValueError, match="elr needs index=rows"):
        fn(torch.zeros(2, 3, dtype=torch.float64), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"index 4 is out of range \[0, 4\)"):
        fn(torch.zeros(2, 3, dtype=torch.float64), torch.tensor([0, 1]), index=torch.tensor([0, 4]))
