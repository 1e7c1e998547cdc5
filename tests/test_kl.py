"""KL estimators k1/k2/k3 (docs/math.md §2, App. D)."""

from __future__ import annotations

import math

import pytest
import torch

from rpgrl.algorithm.kl import k1, k2, k3, kl_penalty

DT = torch.float64


def test_hand_computed_values():
    logp, ref = torch.tensor([math.log(0.5)], dtype=DT), torch.tensor([math.log(0.25)], dtype=DT)
    # r = pi_ref / pi = 0.5
    assert k1(logp, ref).item() == pytest.approx(math.log(2), rel=1e-15)
    assert k2(logp, ref).item() == pytest.approx(0.5 * math.log(2) ** 2, rel=1e-15)
    assert k3(logp, ref).item() == pytest.approx(0.5 - 1 + math.log(2), rel=1e-14)
    for kind, fn in (("k1", k1), ("k2", k2), ("k3", k3)):
        assert torch.equal(kl_penalty(logp, ref, kind), fn(logp, ref))


def test_k3_nonnegative_zero_at_equality_and_accurate_for_tiny_ratios():
    x = torch.linspace(-5, 5, 101, dtype=DT)
    assert (k3(x, torch.zeros_like(x)) >= 0).all()
    assert k3(torch.tensor([-1.3]), torch.tensor([-1.3])).item() == 0.0
    tiny = torch.tensor([1e-8], dtype=DT)
    assert k3(tiny, torch.zeros_like(tiny)).item() == pytest.approx(0.5e-16, rel=1e-6)


def test_app_d_k3_expectations_equal_unnormalized_kl():
    """E_anc[k3(pi_theta/pi_anc)] = UKL(pi_anc || pi_theta) and
    E_theta[k3(pi_anc/pi_theta)] = UKL(pi_theta || pi_anc), for unnormalized measures."""
    g = torch.Generator().manual_seed(0)
    lt, la = torch.randn(6, generator=g, dtype=DT), torch.randn(6, generator=g, dtype=DT)
    pt, pa = lt.exp(), la.exp()
    ukl_a_t = (pa * (la - lt)).sum() + (pt - pa).sum()
    ukl_t_a = (pt * (lt - la)).sum() + (pa - pt).sum()
    torch.testing.assert_close((pa * k3(la, lt)).sum(), ukl_a_t, rtol=1e-13, atol=0)
    torch.testing.assert_close((pt * k3(lt, la)).sum(), ukl_t_a, rtol=1e-13, atol=0)
    # k1 is unbiased for the normalized KL
    lt_n, la_n = torch.log_softmax(lt, 0), torch.log_softmax(la, 0)
    kl = (lt_n.exp() * (lt_n - la_n)).sum()
    torch.testing.assert_close((lt_n.exp() * k1(lt_n, la_n)).sum(), kl, rtol=1e-13, atol=0)


def test_extreme_inputs_are_finite():
    logp = torch.tensor([-1e4, 0.0, -50.0], dtype=torch.float32, requires_grad=True)
    ref = torch.tensor([0.0, -1e4, 0.0], dtype=torch.float32)
    for kind in ("k1", "k2", "k3"):
        out = kl_penalty(logp, ref, kind)
        (grad,) = torch.autograd.grad(out.sum(), logp)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()


def test_errors():
    with pytest.raises(ValueError, match="unknown KL estimator kind='k4'"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match="shape"):
        kl_penalty(torch.zeros(2), torch.zeros(3))
