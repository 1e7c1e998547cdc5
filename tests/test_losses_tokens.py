"""Token-level behaviour of ``policy_loss`` on [B, T] batches (docs/math.md §3, §4.1, §6).

Closed-form per-token gradients, every branch of Algorithm 2, the dual clip, masking with
extreme inputs, gradient accumulation, metrics and argument validation.
"""

from __future__ import annotations

import math

import pytest
import torch

from rpgrl.losses import AGG_MODES, DIVERGENCES, LOSSES, METRIC_KEYS, aggregation_count, policy_loss

DT = torch.float64
EL, EH, C = 0.2, 0.28, 10.0
DIVS = list(DIVERGENCES)


def g_ref(div, lp, old, anc, adv, beta):
    """Spec section 2's per-token gradient weight g_t, written out independently."""
    w, rho, v = (lp - old).exp(), (lp - anc).exp(), (anc - old).exp()
    kl = {
        "fkl": beta * v,
        "rkl": -beta * w * (rho.log() + 1),
        "ufkl": -beta * (w - v),
        "urkl": -beta * w * rho.log(),
    }[div]
    return w * adv + kl, kl


def _batch(seed=0, B=5, T=6):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=DT) * 3 - 0.01
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=DT)
    anc = lp + 0.3 * torch.randn(B, T, generator=g, dtype=DT)
    adv = torch.randn(B, generator=g, dtype=DT)
    lengths = torch.tensor([6, 3, 1, 0, 4])[:B]  # right padding, one empty row
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return lp, old, anc, adv, mask


def _grad(name, lp, *args, **kw):
    lp = lp.clone().requires_grad_(True)
    loss, metrics = policy_loss(name, lp, *args, **kw)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad, metrics


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("separate_anchor", [False, True])
@pytest.mark.parametrize("kernel", ["rpg_", "rpg_reinforce_"])
@pytest.mark.parametrize("div", DIVS)
def test_unclipped_token_gradient_is_closed_form(div, kernel, separate_anchor, agg):
    """grad_logp_t = -g_t / count (token-mean), -g_t / #seqs, -g_t / (len_i #seqs)."""
    lp, old, anc, adv, mask = _batch()
    beta = 0.2
    _, grad, _ = _grad(kernel + div, lp, old, adv, mask, anc if separate_anchor else None,
                       beta=beta, clip=None, dual_clip=None, agg=agg)
    g, _ = g_ref(div, lp, old, anc if separate_anchor else old, adv[:, None], beta)
    n_seq = 4  # the empty row is not a sequence
    denom = {
        "token-mean": mask.sum(),
        "seq-mean-token-sum": n_seq,
        "seq-mean-token-mean": mask.sum(1, keepdim=True).clamp(min=1) * n_seq,
    }[agg]
    want = torch.where(mask, -g / denom, 0.0)
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-14)
    assert (grad[~mask] == 0).all()


def test_unclipped_loss_values_match_table_1():
    """Loss values (not only gradients) are the Table 1/4 surrogates, docs/math.md §3."""
    lp, old, anc, adv, mask = _batch(1)
    beta = 0.1
    w, rho, v = (lp - old).exp(), (lp - anc).exp(), (anc - old).exp()
    surrogate = {
        "fkl": -v * lp, "rkl": w * rho.log(), "ufkl": w - v * lp, "urkl": w * rho.log() - w,
    }
    for div, s in surrogate.items():
        loss, _ = policy_loss(f"rpg_{div}", lp, old, adv, mask, anc, beta, None, None)
        want = ((-w * adv[:, None] + beta * s) * mask).sum() / mask.sum()
        torch.testing.assert_close(loss, want, rtol=1e-13, atol=0)


# Algorithm 2 branches: (advantage, log w, gradient flows?, constant multiplier k)
BRANCHES = {
    "psi>=0,w<1+eh": (1.0, 0.1, True, None),
    "psi>=0,w>=1+eh": (1.0, 0.5, False, 1 + EH),
    "psi<0,w<=1-el": (-1.0, -0.5, False, 1 - EL),
    "psi<0,1-el<w<c": (-1.0, 0.5, True, None),
    "psi<0,w>=c": (-1.0, 3.0, False, C),
}


def _one_token(adv_value, log_w):
    """Token 0 is the case under test; token 1 is padding full of extreme values."""
    lp = torch.tensor([[-1.5, -1e4]], dtype=DT)
    old = torch.tensor([[-1.5 - log_w, 50.0]], dtype=DT)
    anc = torch.tensor([[-1.6, -50.0]], dtype=DT)  # log rho = 0.1, v = exp(log_w - 0.1)
    adv = torch.tensor([[adv_value, 1e6]], dtype=DT)
    mask = torch.tensor([[True, False]])
    return lp, old, anc, adv, mask


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("branch", list(BRANCHES))
def test_algorithm2_branch(branch, div):
    """Each branch of RPG-Style Clip [Algorithm 2]: gradient -g where it flows, exactly 0 in the
    constant branches; the loss value is the expression of docs/math.md §4.1 in every branch."""
    adv_value, log_w, flows, k = BRANCHES[branch]
    lp, old, anc, adv, mask = _one_token(adv_value, log_w)
    beta = 0.01
    loss, grad, metrics = _grad(f"rpg_reinforce_{div}", lp, old, adv, mask, anc,
                                beta=beta, clip=(EL, EH), dual_clip=C)
    g, c_kl = g_ref(div, lp[0, 0], old[0, 0], anc[0, 0], adv_value, beta)
    nll = 1.5
    w = math.exp(log_w)
    if flows:
        assert grad[0, 0].item() == pytest.approx(-g.item(), rel=1e-14)
        want_value = (adv_value + c_kl / w) * nll * w  # psi * SG(w)
    else:
        assert grad[0, 0].item() == 0.0
        want_value = (adv_value + c_kl / k) * nll * k
    assert loss.item() == pytest.approx(want_value.item(), rel=1e-13)
    assert grad[0, 1].item() == 0.0  # the padding
    assert float(metrics["grad_stopped_frac"]) == (0.0 if flows else 1.0)
    expected_case = {1 + EH: "clipfrac_upper", 1 - EL: "clipfrac_lower", C: "clipfrac_dual"}.get(k)
    for key in ("clipfrac_upper", "clipfrac_lower", "clipfrac_dual"):
        assert float(metrics[key]) == (1.0 if key == expected_case else 0.0)


def test_algorithm2_sign_uses_kl_corrected_advantage():
    """psi's sign is that of A' = A + C_KL/w, not of A: a small positive A with a large URKL
    penalty is treated as psi < 0, so w = 1.5 keeps its gradient in RPG-REINFORCE while the
    differentiable loss (sign of A) clips its policy term and keeps only the KL gradient."""
    lp, old, anc, adv, mask = _one_token(1e-3, math.log(1.5))
    beta = 0.1
    g, c_kl = g_ref("urkl", lp[0, 0], old[0, 0], old[0, 0], 1e-3, beta)
    assert g < 0
    _, grad_r, m_r = _grad("rpg_reinforce_urkl", lp, old, adv, mask, beta=beta, clip=(EL, EH), dual_clip=C)
    assert grad_r[0, 0].item() == pytest.approx(-g.item(), rel=1e-13)
    _, grad_d, m_d = _grad("rpg_urkl", lp, old, adv, mask, beta=beta, clip=(EL, EH), dual_clip=C)
    assert grad_d[0, 0].item() == pytest.approx(-c_kl.item(), rel=1e-13)
    assert float(m_d["clipfrac_upper"]) == 1.0 and float(m_r["clipfrac_upper"]) == 0.0


@pytest.mark.parametrize("name", [f"rpg_{d}" for d in DIVS] + ["ppo"])
@pytest.mark.parametrize("branch", list(BRANCHES))
def test_differentiable_dual_clip_branches(branch, name):
    """Algorithm 1: the clipped policy term has zero gradient; the KL term keeps its own."""
    adv_value, log_w, flows, k = BRANCHES[branch]
    lp, old, anc, adv, mask = _one_token(adv_value, log_w)
    beta = 0.01
    loss, grad, _ = _grad(name, lp, old, adv, mask, anc, beta=beta, clip=(EL, EH), dual_clip=C)
    if name == "ppo":
        g, c_kl = math.exp(log_w) * adv_value, 0.0
    else:
        g, c_kl = g_ref(name[4:], lp[0, 0], old[0, 0], anc[0, 0], adv_value, beta)
    want = -g if flows else -c_kl
    assert grad[0, 0].item() == pytest.approx(float(want), rel=1e-13, abs=0)
    if name == "ppo":
        w = math.exp(log_w)
        assert loss.item() == pytest.approx(-adv_value * (w if flows else k), rel=1e-14)


def test_ppo_matches_reference_dual_clip_formula():
    """ppo == max(-wA, -clip(w)A), then min(., -cA) for A < 0 (verl's dual-clip PPO)."""
    g = torch.Generator().manual_seed(2)
    B, T = 8, 16
    lp = -torch.rand(B, T, generator=g, dtype=DT) * 4
    old = lp + 0.8 * torch.randn(B, T, generator=g, dtype=DT)
    adv = torch.randn(B, T, generator=g, dtype=DT)
    mask = torch.rand(B, T, generator=g) > 0.25
    c = 2.5
    loss, grad, _ = _grad("ppo", lp, old, adv, mask, clip=(EL, EH), dual_clip=c)
    lpr = lp.clone().requires_grad_(True)
    w = (lpr - old).exp()
    clipped = torch.maximum(-w * adv, -w.clamp(1 - EL, 1 + EH) * adv)
    pg = torch.where(adv < 0, torch.minimum(clipped, -c * adv), clipped)
    ref = (pg * mask).sum() / mask.sum()
    (ref_grad,) = torch.autograd.grad(ref, lpr)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-14, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_extreme_inputs_masked_zero_grad_no_nan(name, agg, dtype):
    """logp = -1e4 and log-ratios +-50 (and inf/nan in padding) never give NaN; padding gets
    exactly zero gradient."""
    lp = torch.tensor([[-1e4, -0.5, -1e4, -1.0], [-2.0, 0.0, -1e4, -3.0]], dtype=dtype)
    old = lp + torch.tensor([[50.0, -50.0, 0.1, 0.0], [-50.0, 50.0, 0.0, 0.0]], dtype=dtype)
    anc = lp + torch.tensor([[-50.0, 50.0, 50.0, 0.0], [50.0, -50.0, 0.0, 0.0]], dtype=dtype)
    adv = torch.tensor([[1e3, -1e3, 1.0, -2.0], [-5.0, 5.0, 1.0, 1.0]], dtype=dtype)
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    # garbage in the padding
    old[0, 3], anc[0, 2], adv[0, 3], lp[1, 3] = float("nan"), float("inf"), float("nan"), -float("inf")
    for anchor in (None, anc):
        for clip, dual in (((EL, EH), C), (None, None)):
            loss, grad, metrics = _grad(name, lp, old, adv, mask, anchor, beta=0.1, clip=clip,
                                        dual_clip=dual, agg=agg)
            assert torch.isfinite(loss), (name, clip)
            assert torch.isfinite(grad).all(), (name, clip, grad)
            assert (grad[~mask] == 0).all()
            assert all(math.isfinite(float(v)) for v in metrics.values())


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_gradient_accumulation_matches_full_batch(name, agg):
    """Spec 6: micro-batches with norm = the mini-batch's count accumulate to the full gradient."""
    lp, old, anc, adv, mask = _batch(3, B=5, T=6)
    kw = dict(beta=0.05, clip=(EL, EH), dual_clip=3.0, agg=agg)
    full_loss, full_grad, _ = _grad(name, lp, old, adv, mask, anc, **kw)
    norm = sum(int(aggregation_count(mask[s], agg)) for s in (slice(0, 2), slice(2, 5)))
    lpr = lp.clone().requires_grad_(True)
    total = 0.0
    for s in (slice(0, 2), slice(2, 5)):
        loss, _ = policy_loss(name, lpr[s], old[s], adv[s], mask[s], anc[s], norm=norm, **kw)
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(full_loss.item(), rel=1e-12, abs=1e-15)
    torch.testing.assert_close(lpr.grad, full_grad, rtol=0, atol=1e-15)


def test_metrics_keys_and_hand_computed_values():
    lp = torch.zeros(1, 5, dtype=DT)
    w = torch.tensor([1.5, 0.5, 20.0, 1.0, 100.0], dtype=DT)
    old = -w.log()[None]
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0]], dtype=DT)
    mask = torch.tensor([[True, True, True, True, False]])
    _, metrics = policy_loss("ppo", lp, old, adv, mask, clip=(EL, EH), dual_clip=C)
    assert set(metrics) == set(METRIC_KEYS) == {
        "clipfrac_upper", "clipfrac_lower", "clipfrac_dual", "importance_weight_mean",
        "importance_weight_max", "kl_rollout_k1", "kl_rollout_k3", "kl_anchor_k1",
        "kl_anchor_k3", "grad_stopped_frac", "coef_kl_abs", "coef_pg_abs",
    }
    v = {k: float(x) for k, x in metrics.items()}
    lw = w[:4].log()
    assert (v["clipfrac_upper"], v["clipfrac_lower"], v["clipfrac_dual"]) == (0.25, 0.25, 0.25)
    assert v["grad_stopped_frac"] == 0.75
    assert v["importance_weight_mean"] == pytest.approx(23.0 / 4)
    assert v["importance_weight_max"] == pytest.approx(20.0, rel=1e-14)
    assert v["kl_rollout_k1"] == pytest.approx(lw.mean().item())
    assert v["kl_rollout_k3"] == pytest.approx((1 / w[:4] - 1 + lw).mean().item())
    assert (v["kl_anchor_k1"], v["kl_anchor_k3"]) == (v["kl_rollout_k1"], v["kl_rollout_k3"])
    anc = torch.full_like(lp, -0.5)
    _, m2 = policy_loss("ppo", lp, old, adv, mask, anchor_logp=anc)
    assert float(m2["kl_anchor_k1"]) == pytest.approx(0.5)
    assert float(m2["kl_anchor_k3"]) == pytest.approx(math.exp(-0.5) - 1 + 0.5)
    assert not any(torch.is_tensor(x) and x.requires_grad for x in metrics.values())


def test_float_mask_and_broadcast_advantages_are_equivalent():
    lp, old, anc, adv, mask = _batch(4)
    a, _ = policy_loss("rpg_reinforce_ufkl", lp, old, adv, mask, anc)
    b, _ = policy_loss("rpg_reinforce_ufkl", lp, old, adv[:, None].expand_as(lp), mask.to(DT), anc)
    assert a.item() == b.item()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="rpg_nope"), "known losses: rpg_fkl"),
        (dict(dual_clip=1.0), "dual_clip must be > 1"),
        (dict(beta=-1e-4), "beta must be"),
        (dict(clip=(1.2, 0.2)), "eps_low < 1"),
        (dict(agg="sum"), "unknown agg"),
        (dict(norm=0), "norm must be > 0"),
        (dict(old_logp=torch.zeros(2, 4)), r"old_logp shape \(2, 4\) != logp shape \(2, 3\)"),
        (dict(anchor_logp=torch.zeros(3, 3)), "anchor_logp shape"),
        (dict(advantages=torch.zeros(3)), "advantages shape"),
        (dict(name="rpg_reinforce_urkl", kl_in_advantage=True), "kl_in_advantage"),
        (dict(name="ppo", kl_in_advantage=True), "kl_in_advantage"),
    ],
)
def test_invalid_arguments_raise_clear_errors(kwargs, match):
    args = dict(name="rpg_urkl", logp=torch.zeros(2, 3), old_logp=torch.zeros(2, 3),
                advantages=torch.zeros(2), mask=torch.ones(2, 3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        policy_loss(args.pop("name"), args.pop("logp"), args.pop("old_logp"),
                    args.pop("advantages"), args.pop("mask"), **args)


def test_registry_names():
    required = {f"rpg_{p}{d}" for p in ("", "reinforce_") for d in ("fkl", "rkl", "ufkl", "urkl")}
    assert required | {"ppo", "grpo", "grpo_corrected"} <= set(LOSSES)
    assert {n for n, s in LOSSES.items() if s.kernel == "reinforce"} == {
        f"rpg_reinforce_{d}" for d in DIVS
    }


def test_kl_share_coefficients_by_hand():
    """coef_pg_abs = mean |w A|, coef_kl_abs = mean |C_KL| over valid tokens (docs/math.md §2's
    C_KL for each row; GRPO's k3 term: beta (pi_ref/pi_theta - 1)); 0 without a KL term."""
    from rpgrl.losses.policy import kl_share

    beta = 0.1
    w = torch.tensor([[2.0, 0.5, 1.0, 7.0]], dtype=DT)
    lp = torch.zeros(1, 4, dtype=DT)
    old = -w.log()  # log w = lp - old
    adv = torch.tensor([[1.0, -2.0, 3.0, 9.0]], dtype=DT)
    mask = torch.tensor([[True, True, True, False]])
    anc = torch.tensor([[-0.3, 0.2, 0.0, 5.0]], dtype=DT)  # log rho = -anc, v = pi_anc/pi_old
    wv, lrho, v = w[0, :3], -anc[0, :3], (anc - old).exp()[0, :3]
    pg = float((wv * adv[0, :3]).abs().mean())
    want = {
        "rpg_reinforce_fkl": beta * v,
        "rpg_fkl": beta * v,
        "rpg_reinforce_rkl": beta * wv * (lrho + 1),
        "rpg_ufkl": beta * (wv - v),
        "rpg_reinforce_urkl": beta * wv * lrho,
        "grpo": beta * ((-lrho).exp() - 1),
        "grpo_corrected": beta * wv * lrho,
    }
    for name, c in want.items():
        _, m = policy_loss(name, lp, old, adv, mask, anchor_logp=anc, beta=beta, clip=None, dual_clip=None)
        assert float(m["coef_pg_abs"]) == pytest.approx(pg, rel=1e-12), name
        assert float(m["coef_kl_abs"]) == pytest.approx(float(c.abs().mean()), rel=1e-12), name
    _, m = policy_loss("ppo", lp, old, adv, mask, anchor_logp=anc, beta=beta)
    assert float(m["coef_kl_abs"]) == 0.0 and float(m["coef_pg_abs"]) == pytest.approx(pg, rel=1e-12)
    _, m = policy_loss("rpg_reinforce_ufkl", lp, old, adv, mask, beta=0.0)
    assert float(m["coef_kl_abs"]) == 0.0
    # rollout anchor (v = 1, rho = w): UFKL's C_KL = -beta (w - 1)
    _, m = policy_loss("rpg_reinforce_ufkl", lp, old, adv, mask, beta=beta)
    assert float(m["coef_kl_abs"]) == pytest.approx(float((beta * (wv - 1)).abs().mean()), rel=1e-12)
    assert kl_share(0.5, 2.0) == 0.25 and math.isnan(kl_share(0.5, 0.0))


def test_kl_share_is_the_exact_split_of_the_reinforce_gradient():
    """For the REINFORCE kernel, unclipped, the token gradient is -(w A + C_KL) grad logp / n:
    the gradient with beta minus the one with beta = 0 is the KL part, whose mean |.| * n is
    coef_kl_abs * n, and the beta = 0 gradient's is coef_pg_abs * n."""
    torch.manual_seed(0)
    lp0 = torch.randn(3, 5, dtype=DT) * 0.3
    old = lp0 + torch.randn(3, 5, dtype=DT) * 0.2
    adv = torch.randn(3, dtype=DT)
    mask = torch.rand(3, 5) > 0.2
    n = int(mask.sum())
    grads = {}
    for beta in (0.0, 0.05):
        lp = lp0.clone().requires_grad_(True)
        loss, m = policy_loss("rpg_reinforce_urkl", lp, old, adv, mask, beta=beta, clip=None, dual_clip=None)
        loss.backward()
        grads[beta] = (lp.grad, m)
    kl_part = (grads[0.05][0] - grads[0.0][0]) * n
    pg_part = grads[0.0][0] * n
    m = grads[0.05][1]
    assert float(kl_part[mask].abs().mean()) == pytest.approx(float(m["coef_kl_abs"]), rel=1e-10)
    assert float(pg_part[mask].abs().mean()) == pytest.approx(float(m["coef_pg_abs"]), rel=1e-10)
