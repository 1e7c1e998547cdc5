"""Name -> loss registry and the single entry point ``policy_loss`` (spec sections 3-6).

Every registered loss is (kernel, KL row): ``rpg_<div>`` = differentiable kernel with the
divergence's surrogate [Table 1/4, Algorithm 1], ``rpg_reinforce_<div>`` = REINFORCE kernel
with RPG-Style Clip [Table 2, Algorithm 2], ``ppo`` = differentiable kernel without KL,
``grpo`` / ``grpo_corrected`` = differentiable kernel with GRPO's k3 rows (spec 5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
from torch import Tensor

from rpgrl.kl import k3_from_log_ratio
from rpgrl.losses.aggregate import AGG_MODES, aggregate
from rpgrl.losses.clip import TrustRegion
from rpgrl.losses.divergences import DIVERGENCES, GRPO_KL, GRPO_KL_CORRECTED, Divergence
from rpgrl.losses.surrogates import (
    Ratios,
    differentiable_token_loss,
    importance_ratios,
    reinforce_token_loss,
)

__all__ = ["LossSpec", "LOSSES", "METRIC_KEYS", "policy_loss"]

METRIC_KEYS = (
    "clipfrac_upper",
    "clipfrac_lower",
    "clipfrac_dual",
    "importance_weight_mean",
    "importance_weight_max",
    "kl_rollout_k1",
    "kl_rollout_k3",
    "kl_anchor_k1",
    "kl_anchor_k3",
    "grad_stopped_frac",
)


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: which kernel, which KL row (None = no KL term), and why it exists."""

    name: str
    kernel: Literal["differentiable", "reinforce"]
    divergence: Optional[Divergence]
    description: str

    @property
    def supports_kl_in_advantage(self) -> bool:
        """Algorithm 1's KL-in-advantage option needs an RPG gradient weight C_KL."""
        return (
            self.kernel == "differentiable"
            and self.divergence is not None
            and self.divergence.kl_weight is not None
        )


def _build_registry() -> dict[str, LossSpec]:
    reg: dict[str, LossSpec] = {}
    for key, div in DIVERGENCES.items():
        reg[f"rpg_{key}"] = LossSpec(
            f"rpg_{key}", "differentiable", div,
            f"RPG, D = {div.D}: dual-clip -w*A + beta*surrogate (Table 1/4, Algorithm 1)",
        )
    for key, div in DIVERGENCES.items():
        reg[f"rpg_reinforce_{key}"] = LossSpec(
            f"rpg_reinforce_{key}", "reinforce", div,
            f"RPG-REINFORCE, D = {div.D}: -SG(g)*logp with RPG-Style Clip (Table 2, Algorithm 2)",
        )
    reg["ppo"] = LossSpec("ppo", "differentiable", None, "dual-clip PPO, no KL term")
    reg["grpo"] = LossSpec(
        "grpo", "differentiable", GRPO_KL,
        "PPO clip + beta*k3(pi_ref/pi_theta), not importance weighted (biased off-policy)",
    )
    reg["grpo_corrected"] = LossSpec(
        "grpo_corrected", "differentiable", GRPO_KL_CORRECTED,
        "PPO clip + beta*w*k3(pi_ref/pi_theta): KL gradient = URKL's (the paper's fix)",
    )
    return reg


#: name -> LossSpec for every loss ``policy_loss`` accepts.
LOSSES: dict[str, LossSpec] = _build_registry()


def _check_args(
    name: str,
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    anchor_logp: Optional[Tensor],
    beta: float,
    clip: Optional[tuple[float, float]],
    dual_clip: Optional[float],
    agg: str,
    kl_in_advantage: bool,
    norm: Optional[Union[float, Tensor]],
) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(LOSSES)}")
    spec = LOSSES[name]
    if logp.dim() != 2:
        raise ValueError(f"policy_loss: logp must be [B, T], got shape {tuple(logp.shape)}")
    if not logp.is_floating_point():
        raise ValueError(f"policy_loss: logp must be a floating tensor, got {logp.dtype}")
    shape = tuple(logp.shape)
    for key, t in (("old_logp", old_logp), ("mask", mask), ("anchor_logp", anchor_logp)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"policy_loss: {key} shape {tuple(t.shape)} != logp shape {shape}")
    if tuple(advantages.shape) not in (shape[:1], shape):
        raise ValueError(
            f"policy_loss: advantages shape {tuple(advantages.shape)} must be [B]={shape[:1]} "
            f"or [B, T]={shape}"
        )
    try:
        beta_ok = math.isfinite(float(beta)) and float(beta) >= 0
    except (TypeError, ValueError):
        beta_ok = False
    if not beta_ok:
        raise ValueError(f"policy_loss: beta must be a finite number >= 0, got {beta!r}")
    if clip is not None:
        if len(clip) != 2:
            raise ValueError(f"policy_loss: clip must be (eps_low, eps_high) or None, got {clip!r}")
        eps_low, eps_high = clip
        if not (0 <= eps_low < 1 and eps_high >= 0):
            raise ValueError(
                f"policy_loss: clip=(eps_low, eps_high) needs 0 <= eps_low < 1 and eps_high >= 0, got {clip!r}"
            )
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"policy_loss: dual_clip must be > 1 (or None to disable), got {dual_clip!r}")
    if agg not in AGG_MODES:
        raise ValueError(f"policy_loss: unknown agg={agg!r}; expected one of {AGG_MODES}")
    if norm is not None and not float(norm) > 0:  # also rejects nan
        raise ValueError(f"policy_loss: norm must be > 0 (the mini-batch's count) or None, got {norm!r}")
    if kl_in_advantage and not spec.supports_kl_in_advantage:
        ok = [n for n, s in LOSSES.items() if s.supports_kl_in_advantage]
        raise ValueError(
            f"policy_loss: kl_in_advantage=True is Algorithm 1's option for the differentiable "
            f"RPG losses {ok}; {name!r} does not support it"
        )
    return spec


def _metrics(ratios: Ratios, region: TrustRegion, valid: Tensor, n: Tensor, has_anchor: bool) -> dict:
    """Token-means over this call's ``n`` valid tokens (detached)."""
    with torch.no_grad():
        zero = torch.zeros((), dtype=ratios.w.dtype, device=ratios.w.device)

        def frac(m: Optional[Tensor]) -> Tensor:
            return zero if m is None else (m & valid).sum() / n

        log_w, w = ratios.log_w.detach(), ratios.w.detach()
        w_valid = torch.where(valid, w, 0.0)
        # masked positions hold log-ratio 0, where k1 = k3 = 0: plain sums are masked sums.
        kl_roll_k1 = log_w.sum() / n
        kl_roll_k3 = k3_from_log_ratio(log_w).sum() / n
        if has_anchor:
            log_rho = ratios.log_rho.detach()
            kl_anc_k1 = log_rho.sum() / n
            kl_anc_k3 = k3_from_log_ratio(log_rho).sum() / n
        else:
            kl_anc_k1, kl_anc_k3 = kl_roll_k1, kl_roll_k3
        return {
            "clipfrac_upper": frac(region.upper),
            "clipfrac_lower": frac(region.lower),
            "clipfrac_dual": frac(region.dual),
            "importance_weight_mean": w_valid.sum() / n,
            "importance_weight_max": w_valid.max() if w_valid.numel() else zero,
            "kl_rollout_k1": kl_roll_k1,
            "kl_rollout_k3": kl_roll_k3,
            "kl_anchor_k1": kl_anc_k1,
            "kl_anchor_k3": kl_anc_k3,
            "grad_stopped_frac": frac(region.stopped),
        }


def policy_loss(
    name: str,
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    anchor_logp: Optional[Tensor] = None,
    beta: float = 1e-4,
    clip: Optional[tuple[float, float]] = (0.2, 0.28),
    dual_clip: Optional[float] = 10.0,
    agg: str = "token-mean",
    *,
    kl_in_advantage: bool = False,
    norm: Optional[Union[float, Tensor]] = None,
    weights: Optional[Tensor] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Scalar loss (to minimize) and detached metrics for the loss ``name`` in ``LOSSES``.

    Args: [B, T] ``logp`` (differentiable), ``old_logp`` (rollout policy), ``mask`` (bool or
    0/1 float; nonzero = valid); ``advantages`` [B] or [B, T]; ``anchor_logp`` the KL anchor
    (None = rollout policy, spec 1.1); ``clip`` = (eps_low, eps_high) or None; ``dual_clip``
    c > 1 or None; ``agg`` and ``norm`` as in ``rpgrl.losses.aggregate`` (spec 6).
    ``weights`` ([B, T] or [B, 1], >= 0, no grad) multiply each token's whole loss before
    aggregation, leaving w, the clip and the counts alone: a sampler-mismatch correction
    (e.g. TRL's vLLM ratio pi_old/pi_sampler) or a soft token mask.
    With ``clip=None, dual_clip=None`` every RPG loss is the exact unclipped surrogate whose
    token gradient is -g_t * grad logp_t / count (spec 2-4). Masked tokens get exactly zero
    gradient whatever they contain.
    """
    spec = _check_args(
        name, logp, old_logp, advantages, mask, anchor_logp, beta, clip, dual_clip, agg,
        kl_in_advantage, norm,
    )
    valid = mask if mask.dtype == torch.bool else mask != 0
    adv = advantages.detach().to(logp.dtype)
    if adv.dim() == 1:
        adv = adv[:, None]
    adv = torch.where(valid, adv, 0.0)
    beta = float(beta)
    if spec.kernel == "reinforce":
        with torch.no_grad():
            ratios = importance_ratios(logp.detach(), old_logp, anchor_logp, valid)
        token_loss, region = reinforce_token_loss(
            logp, ratios, adv, beta, spec.divergence, clip, dual_clip
        )
    else:
        ratios = importance_ratios(logp, old_logp, anchor_logp, valid)
        token_loss, region = differentiable_token_loss(
            logp, ratios, adv, beta, spec.divergence, clip, dual_clip, kl_in_advantage
        )
    token_loss = torch.where(valid, token_loss, 0.0)
    if weights is not None:
        if weights.dim() != 2 or tuple(weights.shape) not in (tuple(logp.shape), (logp.shape[0], 1)):
            raise ValueError(f"policy_loss: weights shape {tuple(weights.shape)} must be [B, T]="
                             f"{tuple(logp.shape)} or [B, 1]")
        token_loss = token_loss * torch.where(valid, weights.detach().to(logp.dtype), 0.0)
    n_valid = valid.sum().clamp(min=1).to(logp.dtype)
    if norm is None and agg == "token-mean":
        norm = n_valid
    loss = aggregate(token_loss, valid, agg, norm)
    return loss, _metrics(ratios, region, valid, n_valid, anchor_logp is not None)
