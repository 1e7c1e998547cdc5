"""Exactness of the RPG losses by enumeration (docs/math.md §2-5), float64.

A single-token categorical policy over K outcomes: the expected loss gradient
sum_x pi_old(x) * grad loss(x) must equal -grad J with J = E_theta[R] - beta*D, where D is
computed exactly by enumeration and differentiated by autograd.
"""

from __future__ import annotations

import math

import pytest
import torch

from rpgrl.losses import DIVERGENCES, policy_loss
from rpgrl.losses.check import Enumeration, exact_objective_gradient, expected_loss_gradient

DT = torch.float64

K = 5
BETA = 0.3  # large, so that a wrong KL gradient cannot hide below the tolerance
RPG_NAMES = [f"rpg_{d}" for d in DIVERGENCES] + [f"rpg_reinforce_{d}" for d in DIVERGENCES]


def _policies(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(K, generator=g, dtype=DT)
    old = theta + 0.5 * torch.randn(K, generator=g, dtype=DT)  # off-policy: w != 1
    anchor = theta + 0.7 * torch.randn(K, generator=g, dtype=DT)
    reward = torch.rand(K, generator=g, dtype=DT)
    return theta, old, anchor, reward


def _softmax(t: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(t, -1)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _problem(theta, old_logp, anchor_logp, adv, log_policy) -> Enumeration:
    """The single-token case (T = 1) of rpgrl.losses.check's enumeration."""
    return Enumeration(theta[None], old_logp[None], None if anchor_logp is None else anchor_logp[None],
                       adv[None], log_policy)


def _expected_loss_grad(name, theta, old_logp, anchor_logp, adv, log_policy, beta=BETA):
    """sum_x pi_old(x) * grad_theta loss(x) (rpgrl.losses.check.expected_loss_gradient)."""
    return expected_loss_gradient(name, _problem(theta, old_logp, anchor_logp, adv, log_policy), beta)[0]


def _exact_grad_J(div, theta, anc_logp_fn, reward, log_policy, beta=BETA):
    """grad J, J = E_theta[R] - beta*D (rpgrl.losses.check.exact_objective_gradient)."""
    anc = anc_logp_fn(None)
    pb = _problem(theta, anc, anc, reward, log_policy)  # old_logp unused by the exact objective
    return -exact_objective_gradient(div, pb, beta)[0]


@pytest.mark.parametrize("separate_anchor", [False, True], ids=["anchor=rollout", "anchor=separate"])
@pytest.mark.parametrize("name", RPG_NAMES)
def test_expected_gradient_equals_exact_objective_gradient(name, separate_anchor):
    """Props. E.1, E.3, 3.2, 3.6 (differentiable: Table 1/4; REINFORCE: Table 2), softmax policy."""
    theta, old, anchor, reward = _policies()
    old_logp = torch.log_softmax(old, 0)
    anc_logp = torch.log_softmax(anchor, 0) if separate_anchor else None
    baseline = (old_logp.exp() * reward).sum()  # any constant baseline leaves the gradient exact
    div = name.rsplit("_", 1)[1]
    got = _expected_loss_grad(
        name, theta, old_logp, anc_logp, reward - baseline, _softmax
    )
    ref_anc = old_logp if anc_logp is None else anc_logp
    want = _exact_grad_J(div, theta, lambda _: ref_anc, reward, _softmax)
    assert want.abs().max() > 1e-2  # non-trivial gradient
    torch.testing.assert_close(got, -want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("separate_anchor", [False, True], ids=["anchor=rollout", "anchor=separate"])
@pytest.mark.parametrize("name", RPG_NAMES)
def test_unnormalized_measures_distinguish_mass_correction(name, separate_anchor):
    """With unnormalized pi_theta(x) = exp(theta_x), D's mass terms matter (docs/math.md §2):
    each loss is exact for its own D, and FKL != UFKL, RKL != URKL."""
    theta, old, anchor, reward = _policies(1)
    anc_logp = anchor if separate_anchor else None
    div = name.rsplit("_", 1)[1]
    got = _expected_loss_grad(name, theta, old, anc_logp, reward, _identity)
    ref_anc = old if anc_logp is None else anc_logp
    want = _exact_grad_J(div, theta, lambda _: ref_anc, reward, _identity)
    torch.testing.assert_close(got, -want, rtol=0, atol=1e-10)
    partner = {"fkl": "ufkl", "ufkl": "fkl", "rkl": "urkl", "urkl": "rkl"}[div]
    other = _exact_grad_J(partner, theta, lambda _: ref_anc, reward, _identity)
    assert (other - want).abs().max() > 1e-3


@pytest.mark.parametrize("separate_anchor", [False, True])
@pytest.mark.parametrize("div", list(DIVERGENCES))
def test_reinforce_and_differentiable_token_gradients_agree(div, separate_anchor):
    """Prop. 4.1: unclipped, -SG(g)*logp and the Table-1 surrogate have the same gradient."""
    g = torch.Generator().manual_seed(3)
    B, T = 4, 7
    logp = (-torch.rand(B, T, generator=g, dtype=DT) * 3).requires_grad_(True)
    old = logp.detach() + 0.4 * torch.randn(B, T, generator=g, dtype=DT)
    anc = logp.detach() + 0.4 * torch.randn(B, T, generator=g, dtype=DT) if separate_anchor else None
    adv = torch.randn(B, generator=g, dtype=DT)
    mask = torch.rand(B, T, generator=g, dtype=DT) > 0.3
    grads = []
    for name in (f"rpg_{div}", f"rpg_reinforce_{div}"):
        loss, _ = policy_loss(name, logp, old, adv, mask, anc, beta=BETA, clip=None, dual_clip=None)
        grads.append(torch.autograd.grad(loss, logp)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-14)
    assert grads[0].abs().max() > 1e-3


@pytest.mark.parametrize("div", list(DIVERGENCES))
def test_kl_in_advantage_matches_reinforce_clip(div):
    """Algorithm 1 with the KL folded into the clipped advantage stops exactly the tokens that
    Algorithm 2 stops, so its token gradients equal RPG-REINFORCE's, clipping included."""
    g = torch.Generator().manual_seed(4)
    B, T = 6, 9
    logp = (-torch.rand(B, T, generator=g, dtype=DT) * 3 - 0.05).requires_grad_(True)
    old = logp.detach() + 0.6 * torch.randn(B, T, generator=g, dtype=DT)
    adv = 0.2 * torch.randn(B, T, generator=g, dtype=DT)
    mask = torch.rand(B, T, generator=g, dtype=DT) > 0.2
    kw = dict(beta=0.2, clip=(0.2, 0.28), dual_clip=3.0)
    loss_d, m_d = policy_loss(f"rpg_{div}", logp, old, adv, mask, kl_in_advantage=True, **kw)
    loss_r, m_r = policy_loss(f"rpg_reinforce_{div}", logp, old, adv, mask, **kw)
    g_d = torch.autograd.grad(loss_d, logp)[0]
    g_r = torch.autograd.grad(loss_r, logp)[0]
    assert 0.05 < float(m_r["grad_stopped_frac"]) < 0.95  # clipping is really exercised
    torch.testing.assert_close(g_d, g_r, rtol=0, atol=1e-14)
    for key in ("clipfrac_upper", "clipfrac_lower", "clipfrac_dual"):
        assert float(m_d[key]) == float(m_r[key])


def test_kl_in_advantage_unclipped_is_the_same_gradient():
    """Folding the KL into A changes nothing without clipping (Algorithm 1)."""
    g = torch.Generator().manual_seed(5)
    logp = (-torch.rand(3, 5, generator=g, dtype=DT) * 2).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(3, 5, generator=g, dtype=DT)
    adv, mask = torch.randn(3, generator=g, dtype=DT), torch.ones(3, 5, dtype=torch.bool)
    for div in DIVERGENCES:
        grads = [
            torch.autograd.grad(
                policy_loss(f"rpg_{div}", logp, old, adv, mask, beta=BETA, clip=None,
                            dual_clip=None, kl_in_advantage=fold)[0], logp)[0]
            for fold in (False, True)
        ]
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-14)


def test_grpo_corrected_has_urkl_gradient_and_grpo_does_not():
    """Spec 5: beta*w*k3(pi_ref/pi_theta) has URKL's gradient; the unweighted k3 does not."""
    theta, old, ref, _ = _policies(2)
    old_logp, ref_logp = torch.log_softmax(old, 0), torch.log_softmax(ref, 0)
    zero_adv = torch.zeros(K, dtype=DT)  # isolate the KL term
    log_policy = _softmax
    want = -_exact_grad_J("urkl", theta, lambda _: ref_logp, torch.zeros(K, dtype=DT), log_policy, beta=1.0)
    corrected = _expected_loss_grad("grpo_corrected", theta, old_logp, ref_logp, zero_adv, log_policy, beta=1.0)
    uncorrected = _expected_loss_grad("grpo", theta, old_logp, ref_logp, zero_adv, log_policy, beta=1.0)
    torch.testing.assert_close(corrected, want, rtol=0, atol=1e-10)
    assert (uncorrected - want).abs().max() > 1e-2


def test_monte_carlo_reinforce_gradient_converges_to_exact():
    """Sampling tokens from pi_old (fixed seed), the mean REINFORCE gradient is within
    4 standard errors of the exact -grad J, per component (docs/math.md §4, Prop. 3.6)."""
    theta, old, anchor, reward = _policies(7)
    old_logp, anc_logp = torch.log_softmax(old, 0), torch.log_softmax(anchor, 0)
    baseline = (old_logp.exp() * reward).sum()
    torch.manual_seed(0)
    N = 20000
    x = torch.multinomial(old_logp.exp(), N, replacement=True)
    th = theta.clone().requires_grad_(True)
    logp = torch.log_softmax(th, 0)[x][:, None]
    logp.retain_grad()
    loss, _ = policy_loss(
        "rpg_reinforce_urkl", logp, old_logp[x][:, None], (reward - baseline)[x],
        torch.ones(N, 1, dtype=torch.bool), anc_logp[x][:, None], beta=BETA, clip=None, dual_clip=None,
    )
    loss.backward()
    # per-sample gradient wrt theta: N * dL/dlogp_i * (onehot(x_i) - pi_theta)
    pi = torch.softmax(theta, 0)
    per_sample = (N * logp.grad) * (torch.nn.functional.one_hot(x, K) - pi)
    mean, se = per_sample.mean(0), per_sample.std(0) / math.sqrt(N)
    torch.testing.assert_close(mean, th.grad, rtol=0, atol=1e-12)  # autograd == per-sample mean
    want = -_exact_grad_J("urkl", theta, lambda _: anc_logp, reward, _softmax)
    z = (mean - want).abs() / se
    assert bool((z < 4).all()), f"z-scores {z.tolist()}"
    assert se.max() < 0.05 * want.abs().max()  # the test has power
