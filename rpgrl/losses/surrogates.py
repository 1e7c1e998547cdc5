"""The two per-token loss kernels: fully differentiable (docs/math.md §3) and REINFORCE (docs/math.md §4).

Both consume a row of the divergence table (``rpgrl.losses.divergences``) and the shared
trust region (``rpgrl.losses.clip``); every named loss is one of these two kernels with a
different row. Inputs are [B, T] tensors already sanitized by ``importance_ratios``: masked
positions hold log-ratio 0 and advantage 0, so nothing there can overflow, and the caller
zeroes masked token losses with ``torch.where`` (exact zero gradient, no NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from rpgrl.algorithm.kl import LOG_RATIO_MAX
from rpgrl.losses.clip import TrustRegion, trust_region
from rpgrl.losses.divergences import Divergence

__all__ = ["Ratios", "importance_ratios", "differentiable_token_loss", "reinforce_token_loss"]


@dataclass
class Ratios:
    """log_w = log(pi_theta/pi_old), w = exp(log_w), log_rho = log(pi_theta/pi_anc),
    v = pi_anc/pi_old (the float 1.0 when the anchor is the rollout policy), docs/math.md §1."""

    log_w: Tensor
    w: Tensor
    log_rho: Tensor
    v: Union[Tensor, float]


def _safe_log_ratio(num: Tensor, den: Tensor, valid: Tensor) -> Tensor:
    # torch.where BEFORE exp: masked positions become exactly 0 and get exactly 0 gradient,
    # whatever (even inf/nan) they held. The clamp only acts beyond w = e^20 ~ 4.9e8.
    return torch.where(valid, num - den, 0.0).clamp_(-LOG_RATIO_MAX, LOG_RATIO_MAX)


def importance_ratios(
    logp: Tensor, old_logp: Tensor, anchor_logp: Optional[Tensor], valid: Tensor
) -> Ratios:
    """Compute w, rho, v of docs/math.md §1 in log space, masked and clamped.

    Differentiable in ``logp`` iff ``logp`` requires grad (pass ``logp.detach()`` for the
    REINFORCE kernel, which needs only constants).
    """
    old_logp = old_logp.detach()
    log_w = _safe_log_ratio(logp, old_logp, valid)
    w = log_w.exp()
    if anchor_logp is None:  # anchor = rollout policy: rho = w, v = 1 (docs/math.md §1.1, mode 1)
        return Ratios(log_w, w, log_w, 1.0)
    anchor_logp = anchor_logp.detach()
    log_rho = _safe_log_ratio(logp, anchor_logp, valid)
    v = _safe_log_ratio(anchor_logp, old_logp, valid).exp_()
    return Ratios(log_w, w, log_rho, v)


def differentiable_token_loss(
    logp: Tensor,
    ratios: Ratios,
    advantages: Tensor,
    beta: float,
    divergence: Optional[Divergence],
    clip: Optional[tuple[float, float]],
    dual_clip: Optional[float],
    kl_in_advantage: bool = False,
) -> tuple[Tensor, TrustRegion]:
    """Per-token loss ``pg_t + beta * S_t`` [docs/math.md §3, Table 1/4, Algorithm 1].

    pg_t is the dual-clip PPO term on -w*A; beta*S_t the divergence's loss term, whose
    gradient is -C_KL * grad logp. Unclipped, the token gradient is -g_t * grad logp_t.
    With ``kl_in_advantage`` the KL weight is folded into the clipped advantage instead,
    A_hat = A + SG(C_KL)/SG(w) (Algorithm 1's option, e.g. URKL: A - beta log w).
    """
    adv = advantages
    kl = None
    if divergence is not None and beta > 0:
        if kl_in_advantage:
            assert divergence.kl_weight is not None
            with torch.no_grad():
                wd = ratios.w.detach()
                c_kl = divergence.kl_weight(beta, wd, ratios.log_rho.detach(), ratios.v)
                adv = adv + c_kl / wd
        else:
            kl = divergence.kl_loss(beta, ratios.w, ratios.log_rho, ratios.v, logp)
    region = trust_region(adv >= 0, ratios.w, clip, dual_clip)
    if kl is None:
        return -(adv * region.ratio), region
    return torch.addcmul(kl, adv, region.ratio, value=-1.0), region  # beta*S - A*ratio


def _plus_product(c: Union[Tensor, float], x: Tensor, y: Tensor) -> Tensor:
    """c + x*y in one pass when c is a tensor."""
    if isinstance(c, Tensor):
        return torch.addcmul(c, x, y)
    out = torch.mul(x, y)
    return out.add_(c) if c != 0 else out


def reinforce_token_loss(
    logp: Tensor,
    ratios: Ratios,
    advantages: Tensor,
    beta: float,
    divergence: Divergence,
    clip: Optional[tuple[float, float]],
    dual_clip: Optional[float],
) -> tuple[Tensor, TrustRegion]:
    """Per-token REINFORCE loss with RPG-Style Clip [docs/math.md §4.1, Algorithm 2, Prop. 4.1].

    g = w*A + C_KL (all constants). psi = A' * nll with A' = A + C_KL/w has the sign of
    g * nll since w > 0. In every branch the loss is (k*A + C_KL) * nll with k = w where
    the gradient flows (then the loss is -g * logp, gradient -g * grad logp) and
    k = 1+eps_high / 1-eps_low / c in the constant branches, where nll is detached.
    """
    with torch.no_grad():
        w = ratios.w
        c_kl = divergence.kl_weight(beta, w, ratios.log_rho, ratios.v) if beta > 0 else 0.0
        g = _plus_product(c_kl, w, advantages)
        region = trust_region(g * logp <= 0, w, clip, dual_clip)  # psi = -g * logp / w >= 0
        stopped = region.stopped
        if stopped is None:
            neg_coef = g.neg_()
        else:  # -(k*A + C_KL), k = w where the gradient flows
            neg_coef = _plus_product(c_kl, region.ratio, advantages).neg_()
    lp = logp if stopped is None else torch.where(stopped, logp.detach(), logp)
    return neg_coef * lp, region
