"""Evaluating a loss: ``policy_loss`` (docs/math.md §3-6), its hyperparameter rules and metrics.

``rpgrl.losses.registry`` says which loss a name means; this module runs it: ratios, the
token loss and its contract check, the optional fixed weights, aggregation and the metrics.
The hyperparameter ranges live here once (``hyperparameter_problems``): ``policy_loss``,
``BoundLoss`` and the training config all apply the same rules.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from rpgrl.algorithm.kl import k3_from_log_ratio
from rpgrl.losses.aggregate import AGG_MODES, aggregate
from rpgrl.losses.clip import TrustRegion
from rpgrl.losses.divergences import DIVERGENCES
from rpgrl.losses.registry import LOSSES
from rpgrl.losses.spec import LossInputs, LossSpec
from rpgrl.losses.surrogates import Ratios

__all__ = ["KL_SHARE_KEYS", "MAX_METRIC_KEYS", "METRIC_KEYS", "apply_loss", "kl_share", "check_hyperparameters", "hyperparameter_problems", "policy_loss",
           "run_token_loss"]

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
    "coef_kl_abs",
    "coef_pg_abs",
)
#: The loss metrics that are maxima, not means: combined by max over micro-batches, optimizer
#: steps and processes wherever they are logged (rpgrl's trainer, the TRL integration).
MAX_METRIC_KEYS = ("importance_weight_max",)
#: The token means of |C_KL| and |w A|, the KL and the reward parts of each token's gradient
#: weight g_t = w*A + C_KL (docs/math.md §2): their ratio, sum|C_KL| / sum|w A| over the tokens
#: of a step, is the KL term's share of the update (``kl_share``, docs/algorithms.md).
KL_SHARE_KEYS = ("coef_kl_abs", "coef_pg_abs")



def _check_tensors(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                   anchor_logp: Optional[Tensor]) -> None:
    """Shapes and dtypes of one call's tensors (checked on every call: cheap, and a wrong
    shape would otherwise broadcast silently)."""
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


def hyperparameter_problems(beta: float, clip: Optional[tuple[float, float]],
                            dual_clip: Optional[float], agg: str) -> list[tuple[str, str]]:
    """(parameter, message) for each out-of-range loss hyperparameter: the one place
    the ranges are stated (beta >= 0; 0 <= eps_low < 1, eps_high >= 0; dual clip c > 1)."""
    problems = []
    try:
        beta_ok = math.isfinite(float(beta)) and float(beta) >= 0
    except (TypeError, ValueError):
        beta_ok = False
    if not beta_ok:
        problems.append(("beta", f"beta must be a finite number >= 0, got {beta!r}"))
    if clip is not None:
        if len(clip) != 2:
            problems.append(("clip", f"clip must be (eps_low, eps_high) or None, got {clip!r}"))
        else:
            eps_low, eps_high = clip
            if not 0 <= eps_low < 1:
                problems.append(("clip_low", f"clip eps_low must satisfy 0 <= eps_low < 1, got {eps_low!r}"))
            if not eps_high >= 0:
                problems.append(("clip_high", f"clip eps_high must be >= 0, got {eps_high!r}"))
    if dual_clip is not None and not dual_clip > 1:
        problems.append(("dual_clip", f"dual_clip must be > 1 (or None to disable), got {dual_clip!r}"))
    if agg not in AGG_MODES:
        problems.append(("agg", f"unknown agg={agg!r}; expected one of {AGG_MODES}"))
    return problems


def check_hyperparameters(name: str, beta: float, clip: Optional[tuple[float, float]],
                          dual_clip: Optional[float], agg: str, kl_in_advantage: bool) -> LossSpec:
    """Resolve ``name`` and validate the hyperparameters (once per run for a BoundLoss)."""
    spec = LOSSES.resolve(name)
    for _, problem in hyperparameter_problems(beta, clip, dual_clip, agg):
        raise ValueError(f"policy_loss: {problem}")
    if kl_in_advantage and not spec.supports_kl_in_advantage:
        ok = [n for n, s in LOSSES.builtins.items() if s.supports_kl_in_advantage]
        raise ValueError(
            f"policy_loss: kl_in_advantage=True is Algorithm 1's option for the differentiable "
            f"RPG losses {ok}; {name!r} does not support it"
        )
    return spec


def kl_share(coef_kl_abs: float, coef_pg_abs: float) -> float:
    """sum|C_KL| / sum|w A| from the two token means over the same tokens (nan when the reward
    part is 0, e.g. no group had a signal)."""
    return coef_kl_abs / coef_pg_abs if coef_pg_abs > 0 else math.nan


def _coefficients(spec: LossSpec, x: LossInputs, ratios: Ratios, n: Tensor) -> tuple[Tensor, Tensor]:
    """Token means of |C_KL| and |w A| (KL_SHARE_KEYS). C_KL is the divergence row's gradient
    weight, 0 for a loss without a KL term (or beta = 0); a plugin loss's is the row of the
    objective it claims, nan if it claims none (its KL part is unknown). Both are taken before
    the trust region: for the
    REINFORCE kernels, where the token gradient is -(w A + C_KL) grad logp, they split each
    unclipped token's update exactly; for the differentiable kernels the KL term is not clipped,
    so |C_KL| is its exact weight and |w A| the reward part before clipping."""
    pg = (ratios.w * x.advantages).abs().sum() / n  # advantages are 0 at masked positions
    d = spec.divergence
    if spec.kernel == "plugin" and d is None:
        if spec.objective not in DIVERGENCES and spec.objective != "none":
            return torch.full_like(pg, math.nan), pg
        d = DIVERGENCES.get(spec.objective)
    if d is None or x.beta == 0:
        return torch.zeros_like(pg), pg
    c = d.gradient_weight(x.beta, ratios.w, ratios.log_rho, ratios.v)
    c = torch.as_tensor(c, dtype=ratios.w.dtype, device=ratios.w.device).expand_as(ratios.w)
    return torch.where(x.mask, c.abs(), 0.0).sum() / n, pg


def _metrics(ratios: Ratios, region: TrustRegion, valid: Tensor, n: Tensor, has_anchor: bool,
             coefficients: tuple[Tensor, Tensor]) -> dict:
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
            "coef_kl_abs": coefficients[0],
            "coef_pg_abs": coefficients[1],
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
    (None = rollout policy, docs/math.md §1.1); ``clip`` = (eps_low, eps_high) or None; ``dual_clip``
    c > 1 or None; ``agg`` and ``norm`` as in ``rpgrl.losses.aggregate`` (docs/math.md §6).
    ``weights`` ([B, T] or [B, 1], >= 0, no grad) multiply each token's whole loss before
    aggregation, leaving w, the clip and the counts alone: a sampler-mismatch correction
    (e.g. TRL's vLLM ratio pi_old/pi_sampler) or a soft token mask.
    With ``clip=None, dual_clip=None`` every RPG loss is the exact unclipped surrogate whose
    token gradient is -g_t * grad logp_t / count (docs/math.md §2-4). Masked tokens get exactly zero
    gradient whatever they contain.
    """
    spec = check_hyperparameters(name, beta, clip, dual_clip, agg, kl_in_advantage)
    return apply_loss(spec, logp, old_logp, advantages, mask, anchor_logp, beta, clip, dual_clip, agg,
                      kl_in_advantage=kl_in_advantage, norm=norm, weights=weights)


def apply_loss(spec: LossSpec, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
               anchor_logp: Optional[Tensor], beta: float, clip: Optional[tuple[float, float]],
               dual_clip: Optional[float], agg: str, *, kl_in_advantage: bool = False,
               norm: Optional[Union[float, Tensor]] = None,
               weights: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`policy_loss` for a resolved ``spec`` whose hyperparameters were already checked
    (:func:`check_hyperparameters`); only the tensors are checked here."""
    _check_tensors(logp, old_logp, advantages, mask, anchor_logp)
    if norm is not None and not float(norm) > 0:  # also rejects nan
        raise ValueError(f"policy_loss: norm must be > 0 (the mini-batch's count) or None, got {norm!r}")
    valid = mask if mask.dtype == torch.bool else mask != 0
    adv = advantages.detach().to(logp.dtype)
    if adv.dim() == 1:
        adv = adv[:, None]
    adv = torch.where(valid, adv, 0.0).expand_as(logp)
    x = LossInputs(
        logp, old_logp.detach(), adv, valid,
        None if anchor_logp is None else anchor_logp.detach(),
        float(beta), None if clip is None else (float(clip[0]), float(clip[1])),
        None if dual_clip is None else float(dual_clip), bool(kl_in_advantage),
    )
    token_loss, region = run_token_loss(spec, x)
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
    ratios = x.detached_ratios()
    with torch.no_grad():
        coefficients = _coefficients(spec, x, ratios, n_valid)
    return loss, _metrics(ratios, region, valid, n_valid, anchor_logp is not None, coefficients)


def run_token_loss(spec: LossSpec, x: LossInputs) -> tuple[Tensor, TrustRegion]:
    """Run a loss's token function and check what it returned against the contract."""
    out = spec.token_loss(x)
    region = None
    if isinstance(out, tuple):
        if len(out) != 2:
            raise ValueError(f"loss {spec.name!r} ({spec.source}) returned a {len(out)}-tuple; "
                             f"expected token_loss or (token_loss, TrustRegion)")
        out, region = out
    if not isinstance(out, Tensor) or tuple(out.shape) != tuple(x.logp.shape) or not out.is_floating_point():
        got = f"shape {tuple(out.shape)} {out.dtype}" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"loss {spec.name!r} ({spec.source}) must return a floating [B, T] token loss "
                         f"of shape {tuple(x.logp.shape)}, got {got}")
    if region is not None and not isinstance(region, TrustRegion):
        raise ValueError(f"loss {spec.name!r} ({spec.source}): the second returned value must be an "
                         f"rpgrl.losses.TrustRegion or None, got {type(region).__name__}")
    return out, region or TrustRegion(x.logp)
