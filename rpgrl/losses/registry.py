"""Name -> loss registry and the single entry point ``policy_loss`` (docs/math.md §3-6).

Every built-in RPG loss is (kernel, KL row): ``rpg_<div>`` = differentiable kernel with the
divergence's surrogate [Table 1/4, Algorithm 1], ``rpg_reinforce_<div>`` = REINFORCE kernel
with RPG-Style Clip [Table 2, Algorithm 2]; ``ppo`` = differentiable kernel without KL,
``grpo`` / ``grpo_corrected`` = differentiable kernel with GRPO's k3 rows (docs/math.md §5);
``gspo`` / ``cispo`` are ``rpgrl.losses.baselines``.

``LOSSES`` is the ONE place where a loss name is resolved: a built-in name, an installed
``rpgrl.losses`` entry point, or a ``module:function`` path (``rpgrl.losses.plugins``). The
config, ``RPGTrainer``, the verl plugin and ``rpgrl check-loss`` all ask ``LOSSES``, so a
user loss works everywhere once it resolves here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Optional, Union

import torch
from torch import Tensor

from rpgrl.kl import k3_from_log_ratio
from rpgrl.losses.aggregate import AGG_MODES, aggregate
from rpgrl.losses.baselines import cispo_token_loss, gspo_token_loss
from rpgrl.losses.clip import TrustRegion
from rpgrl.losses.divergences import DIVERGENCES, GRPO_KL, GRPO_KL_CORRECTED, Divergence
from rpgrl.losses.plugins import PluginError, entry_point_names, is_path, load_entry_point, load_path
from rpgrl.losses.spec import LossInputs, LossSpec, TokenLossFn
from rpgrl.losses.surrogates import Ratios, differentiable_token_loss, reinforce_token_loss

__all__ = ["LossSpec", "LOSSES", "LossRegistry", "METRIC_KEYS", "UnknownLossError", "policy_loss", "run_token_loss",
           "resolve_loss"]

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


def _differentiable(divergence: Optional[Divergence]) -> TokenLossFn:
    def token_loss(x: LossInputs) -> tuple[Tensor, TrustRegion]:
        return differentiable_token_loss(
            x.logp, x.ratios(grad=True), x.advantages, x.beta, divergence, x.clip, x.dual_clip,
            x.kl_in_advantage,
        )

    return token_loss


def _reinforce(divergence: Divergence) -> TokenLossFn:
    def token_loss(x: LossInputs) -> tuple[Tensor, TrustRegion]:
        with torch.no_grad():
            ratios = x.ratios(grad=False)
        return reinforce_token_loss(x.logp, ratios, x.advantages, x.beta, divergence, x.clip, x.dual_clip)

    return token_loss


_GRPO_NOTE = (
    "beta*k3(pi_ref/pi_theta) is not importance weighted: sampled from pi_old its expected "
    "gradient is that of sum_y pi_old(y) k3(pi_ref(y)/pi_theta(y)), which equals the gradient of "
    "UFKL = KL(pi_ref || pi_theta) + mass term (the FORWARD KL for normalized policies), not of "
    "the reverse KL that k3 estimates, and only on-policy (w = 1); off-policy it matches no "
    "KL's gradient (docs/math.md §5). Its fixed point is still pi_theta = pi_ref."
)


def _build_registry() -> dict[str, LossSpec]:
    reg: dict[str, LossSpec] = {}
    for key, div in DIVERGENCES.items():
        reg[f"rpg_{key}"] = LossSpec(
            f"rpg_{key}", "differentiable", div,
            f"RPG, D = {div.D}: dual-clip -w*A + beta*surrogate (Table 1/4, Algorithm 1)",
            _differentiable(div), objective=key,
            coefficient=f"g_t = w*A + C_KL, C_KL = {div.coefficient}; the w*A part is 0 outside the "
                        "dual-clip trust region (sign of A), C_KL always flows",
        )
    for key, div in DIVERGENCES.items():
        reg[f"rpg_reinforce_{key}"] = LossSpec(
            f"rpg_reinforce_{key}", "reinforce", div,
            f"RPG-REINFORCE, D = {div.D}: -SG(g)*logp with RPG-Style Clip (Table 2, Algorithm 2)",
            _reinforce(div), objective=key,
            coefficient=f"g_t = w*A + C_KL, C_KL = {div.coefficient}; the whole g_t is 0 outside the "
                        "RPG-Style Clip region (sign of psi = (A + C_KL/w)*nll)",
        )
    reg["ppo"] = LossSpec("ppo", "differentiable", None, "dual-clip PPO, no KL term",
                          _differentiable(None), objective="none", uses_beta=False,
                          coefficient="g_t = w*A, 0 outside the dual-clip trust region")
    reg["grpo"] = LossSpec(
        "grpo", "differentiable", GRPO_KL,
        "PPO clip + beta*k3(pi_ref/pi_theta), not importance weighted (biased off-policy)",
        _differentiable(GRPO_KL), objective="urkl", note=_GRPO_NOTE,
        coefficient=f"g_t = w*A + {GRPO_KL.coefficient}; the w*A part is 0 outside the clip region",
    )
    reg["grpo_corrected"] = LossSpec(
        "grpo_corrected", "differentiable", GRPO_KL_CORRECTED,
        "PPO clip + beta*w*k3(pi_ref/pi_theta): KL gradient = URKL's (the paper's fix)",
        _differentiable(GRPO_KL_CORRECTED), objective="urkl",
        coefficient=f"g_t = w*A + {GRPO_KL_CORRECTED.coefficient}; the w*A part is 0 outside the clip region",
    )
    reg["gspo"] = LossSpec(
        "gspo", "gspo", None,
        "GSPO: PPO clip on the sequence-level ratio exp(mean_t log w), no KL (arXiv 2507.18071)",
        gspo_token_loss, objective="none", uses_beta=False, uses_dual_clip=False,
        coefficient="g_t = s_i*A (s_i = exp(mean_t log w_t), the sequence's ratio), 0 where the "
                    "sequence is clipped",
        note="every token of a sequence is weighted by the sequence's geometric-mean ratio s_i, "
             "not by its own w_t: exact on-policy (s_i = 1), biased off-policy",
    )
    reg["cispo"] = LossSpec(
        "cispo", "cispo", None,
        "CISPO: -SG(clip(w, 1-eps_low, 1+eps_high))*A*logp, every token keeps a gradient, no KL "
        "(arXiv 2506.13585)",
        cispo_token_loss, objective="none", uses_beta=False, uses_dual_clip=False,
        coefficient="g_t = clip(w, 1-eps_low, 1+eps_high)*A (never 0: no token is stopped)",
        note="the clipped weight truncates the importance correction: exact only where "
             "1-eps_low <= w <= 1+eps_high",
    )
    return reg


class UnknownLossError(ValueError, KeyError):
    """A loss name that is neither built in, nor an entry point, nor an importable path."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class LossRegistry(Mapping):
    """name -> LossSpec. Built-ins first, then ``rpgrl.losses`` entry points, then
    ``module:function`` paths (loaded on first use and cached). Iteration lists the built-ins
    and the installed entry points (without loading them)."""

    def __init__(self, builtins: dict[str, LossSpec]):
        self._builtins = builtins
        self._loaded: dict[str, LossSpec] = {}

    @property
    def builtins(self) -> dict[str, LossSpec]:
        return dict(self._builtins)

    def resolve(self, name: str) -> LossSpec:
        """The LossSpec for ``name``; raises UnknownLossError that says why not."""
        if not isinstance(name, str):
            raise UnknownLossError(f"loss name must be a string, got {name!r}")
        spec = self._builtins.get(name) or self._loaded.get(name)
        if spec is not None:
            return spec
        try:
            spec = load_path(name) if is_path(name) else load_entry_point(name)
        except PluginError as exc:
            raise UnknownLossError(str(exc)) from exc
        if spec is None:
            raise UnknownLossError(
                f"{name!r} is not one of the known losses: {', '.join(self)} (built-in and installed "
                f"'rpgrl.losses' entry points), nor a 'package.module:function' path"
            )
        self._loaded[name] = spec
        return spec

    def forget(self, name: str) -> None:
        """Drop a loaded plugin (tests, or after reinstalling a package)."""
        self._loaded.pop(name, None)

    def __getitem__(self, name: str) -> LossSpec:
        return self.resolve(name)

    def __contains__(self, name: object) -> bool:
        try:
            self.resolve(name)  # type: ignore[arg-type]
        except UnknownLossError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        yield from self._builtins
        for name in entry_point_names():
            if name not in self._builtins:
                yield name

    def __len__(self) -> int:
        return sum(1 for _ in self)


#: name -> LossSpec for every loss ``policy_loss`` accepts (see LossRegistry).
LOSSES = LossRegistry(_build_registry())


def resolve_loss(name: str) -> LossSpec:
    """``LOSSES.resolve``: the spec of a built-in, entry-point or ``module:function`` loss."""
    return LOSSES.resolve(name)


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


def check_hyperparameters(name: str, beta: float, clip: Optional[tuple[float, float]],
                          dual_clip: Optional[float], agg: str, kl_in_advantage: bool) -> LossSpec:
    """Resolve ``name`` and validate the hyperparameters (once per run for a BoundLoss)."""
    spec = LOSSES.resolve(name)
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
    if kl_in_advantage and not spec.supports_kl_in_advantage:
        ok = [n for n, s in LOSSES.builtins.items() if s.supports_kl_in_advantage]
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
    return loss, _metrics(x.detached_ratios(), region, valid, n_valid, anchor_logp is not None)


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
