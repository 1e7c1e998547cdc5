"""Every rpgrl policy loss and the ``rpg`` advantage estimator inside verl 0.9.

``pip install -e ".[verl]"`` (in the clone) installs an entry point in verl's ``verl.plugins`` group;
verl 0.9's ``verl/__init__.py`` loads every such entry point on ``import verl`` (in the
driver and in every Ray worker; ``VERL_USE_EXTERNAL_PLUGINS=none`` turns this off). Loading
it imports this module, which registers:

* every loss of ``rpgrl.losses.LOSSES`` with ``core_algos.register_policy_loss``, under its
  own name for the RPG losses (``rpg_ufkl``, ``rpg_reinforce_ufkl``, ...) and with an
  ``rpgrl_`` prefix for the others (``rpgrl_ppo``, ``rpgrl_grpo``, ``rpgrl_grpo_corrected``,
  ``rpgrl_gspo``, ``rpgrl_cispo``, and user losses from ``rpgrl.losses`` entry points, e.g.
  ``rpgrl_my_loss``) so that they cannot be mistaken for verl's own; a
  ``package.module:function`` loss_mode is registered under that name when
  ``RPGPolicyLossConfig`` is built; select one with
  ``actor_rollout_ref.actor.policy_loss.loss_mode=<name>``;
* ``rpg`` (A = R - mean of the group, docs/math.md §5) with ``register_adv_est``; select it
  with ``algorithm.adv_estimator=rpg``.

``RPGPolicyLossConfig`` (``actor_rollout_ref.actor.policy_loss._target_``) carries beta,
the anchor and Algorithm 1's KL-in-advantage switch; the trust region comes from verl's own
actor keys: clip = (``clip_ratio_low``, ``clip_ratio_high``), dual clip c = ``clip_ratio_c``.

Normalization is verl's: ``ppo_loss`` stores the mini-batch's global token / sequence counts
and the data-parallel size in ``config.global_batch_info`` (what verl's ``agg_loss`` reads),
and ``verl_normalization`` turns them into rpgrl's ``(agg, norm)`` so that the value is
exactly ``agg_loss(token_loss, mask, mode, **global_batch_info)`` for all five verl modes
(docs/math.md §6: whole mini-batch denominators, times dp_size because FSDP averages
gradients over ranks).

Rollout correction: verl's ``algorithm.rollout_correction`` weights r = pi_old / pi_rollout
(``rollout_is_weights``) multiply each token's whole rpgrl loss as constants, while the trust
region, dual clip and KL act on w = pi_theta / pi_old (``rollout_correction_weights``);
rejection arrives as a smaller ``response_mask``.

The anchor (docs/math.md §1.1): ``anchor=rollout`` (default) is pi_old, needs nothing else and works
with ``python -m verl.trainer.main_ppo``. ``fixed`` / ``periodic`` / ``adaptive`` need the
reference log-probs in the loss and a reference that can be refreshed; verl 0.9.1's
``ppo_loss`` passes neither (verl/workers/utils/losses.py:104-112), so those run through
:mod:`rpgrl.integrations.verl_anchor` (``python -m rpgrl.integrations.verl_anchor``, verl's own
``run_ppo`` with an actor worker that hands ``ref_log_prob`` to the loss through
:func:`anchor_log_prob` and copies the actor into the reference at batch boundaries).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

try:
    from verl.trainer.ppo import core_algos
    from verl.utils import as_torch_index
    from verl.workers.config import PolicyLossConfig
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError(
        "rpgrl.integrations.verl needs verl 0.9 (pip install -e '.[verl]' in the rpgrl clone); "
        f"importing verl failed: {exc}"
    ) from exc

from rpgrl.algorithm.advantages import compute_advantages
from rpgrl.algorithm.anchor import ANCHOR_MODES
from rpgrl.losses import LOSSES, UnknownLossError, aggregation_count, policy_loss

__all__ = [
    "ANCHORS",
    "DEFAULT_BETA",
    "VERL_AGG_MODES",
    "VERL_LOSS_NAMES",
    "RPGPolicyLossConfig",
    "anchor_log_prob",
    "make_policy_loss_fn",
    "register",
    "rollout_correction_weights",
    "rpg_outcome_advantage",
    "verl_normalization",
]

#: Paper default KL coefficient (docs/math.md §7).
DEFAULT_BETA = 1e-4
#: KL anchors (docs/math.md §1.1, rpgrl.algorithm.anchor): all but "rollout" need rpgrl.integrations.verl_anchor.
ANCHORS = tuple(ANCHOR_MODES)
#: The reference log-probs of the micro-batch being scored, set by verl_anchor's loss wrapper.
_ANCHOR_LOG_PROB: ContextVar[Optional[Tensor]] = ContextVar("rpgrl_verl_anchor_log_prob", default=None)


@contextmanager
def anchor_log_prob(ref_log_prob: Tensor) -> Iterator[None]:
    """Make ``ref_log_prob`` ([B, T], the padded response layout of ``ppo_loss``) the anchor
    of rpgrl losses called inside this block (verl's loss signature has no slot for it)."""
    token = _ANCHOR_LOG_PROB.set(ref_log_prob)
    try:
        yield
    finally:
        _ANCHOR_LOG_PROB.reset(token)


#: verl 0.9.1's ``loss_agg_mode`` values (verl ActorConfig.__post_init__).
VERL_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)


def _verl_name(name: str) -> str:
    return name if name.startswith("rpg_") else f"rpgrl_{name}"


#: verl ``loss_mode`` -> rpgrl loss name, for every loss in ``rpgrl.losses.LOSSES``.
VERL_LOSS_NAMES: dict[str, str] = {_verl_name(n): n for n in LOSSES}


def _check_rpg_options(beta: Any, anchor: Any, where: str, period: Any = 20, kappa: Any = 0.05,
                       ema: Any = 0.9) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not float(beta) >= 0:
        raise ValueError(f"{where}.beta must be a number >= 0 (paper: 1e-4), got {beta!r}")
    if anchor not in ANCHORS:
        raise ValueError(f"{where}.anchor={anchor!r}: expected one of {ANCHORS} (docs/math.md §1.1)")
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"{where}.anchor_period must be an integer >= 1 (optimizer steps), got {period!r}")
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not float(kappa) > 0:
        raise ValueError(f"{where}.anchor_kappa must be a number > 0, got {kappa!r}")
    if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 <= float(ema) < 1:
        raise ValueError(f"{where}.anchor_ema must be in [0, 1), got {ema!r}")


@dataclass
class RPGPolicyLossConfig(PolicyLossConfig):
    """verl ``policy_loss`` config with RPG's options (select it via ``_target_``).

    beta: KL coefficient of docs/math.md §2-4 (paper 1e-4); anchor: rollout | fixed | periodic |
    adaptive (docs/math.md §1.1; all but rollout need ``python -m rpgrl.integrations.verl_anchor``),
    refreshed every ``anchor_period`` optimizer steps (periodic) or when the moving average
    (factor ``anchor_ema``) of the token KL to the anchor exceeds ``anchor_kappa`` (adaptive),
    as rpgrl's ``algorithm.anchor.{period_optimizer_steps,kappa,ema}``; kl_in_advantage: fold the KL weight
    into the clipped advantage (Algorithm 1, differentiable ``rpg_*`` losses only).
    """

    loss_mode: str = "rpg_reinforce_ufkl"
    beta: float = DEFAULT_BETA
    anchor: str = "rollout"
    anchor_period: int = 20
    anchor_kappa: float = 0.05
    anchor_ema: float = 0.9
    kl_in_advantage: bool = False

    def __post_init__(self) -> None:
        where = "actor_rollout_ref.actor.policy_loss"
        _check_rpg_options(self.beta, self.anchor, where, self.anchor_period, self.anchor_kappa, self.anchor_ema)
        if self.loss_mode not in VERL_LOSS_NAMES:
            _refresh_names()  # an entry point installed after import
        if self.loss_mode not in VERL_LOSS_NAMES and ":" in self.loss_mode and self.loss_mode in LOSSES:
            # loss_mode="package.module:function": register it under that very name, here in
            # the worker that builds this config, before verl looks the loss_mode up
            VERL_LOSS_NAMES[self.loss_mode] = self.loss_mode
            _register_one(self.loss_mode, self.loss_mode)
        if self.loss_mode not in VERL_LOSS_NAMES:
            # verl's yaml sets loss_mode: vanilla, so _target_ alone does not select RPG
            warnings.warn(
                f"{where}: RPGPolicyLossConfig with loss_mode={self.loss_mode!r}, which is not an "
                f"rpgrl loss, so beta/anchor are ignored; set {where}.loss_mode to one of "
                f"{list(VERL_LOSS_NAMES)}",
                stacklevel=2,
            )
        if self.kl_in_advantage:
            spec = LOSSES.get(VERL_LOSS_NAMES.get(self.loss_mode, ""))
            if spec is None or not spec.supports_kl_in_advantage:
                ok = [v for v, n in VERL_LOSS_NAMES.items() if LOSSES[n].supports_kl_in_advantage]
                raise ValueError(
                    f"{where}.kl_in_advantage=True needs loss_mode in {ok}, got {self.loss_mode!r}"
                )


def verl_normalization(
    response_mask: Tensor, loss_agg_mode: str, global_batch_info: Mapping[str, Any]
) -> tuple[str, Optional[float]]:
    """rpgrl ``(agg, norm)`` whose ``aggregate`` equals verl's ``agg_loss(..., **global_batch_info)``.

    verl divides the local sum by the global count and multiplies by dp_size (FSDP averages
    gradients over ranks), so norm = global count / dp_size: token-mean -> batch_num_tokens,
    seq-mean-* -> global_batch_size, token-sum -> 1, seq-mean-token-sum-norm additionally
    times loss_scale_factor (default: the padded response length), as in verl 0.9.1.
    A missing global count means "this batch's own count" (verl's dp_size == 1 fallback).
    """
    if loss_agg_mode not in VERL_AGG_MODES:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r}; verl 0.9 knows {VERL_AGG_MODES}")
    dp_size = int(global_batch_info.get("dp_size") or 1)
    if loss_agg_mode == "token-sum":
        return "token-mean", 1.0 / dp_size
    token_level = loss_agg_mode == "token-mean"
    key = "batch_num_tokens" if token_level else "global_batch_size"
    count = global_batch_info.get(key)
    if count is None and dp_size > 1:
        raise ValueError(
            f"loss_agg_mode={loss_agg_mode!r} with dp_size={dp_size} needs global_batch_info[{key!r}] "
            f"(verl's ppo_loss sets it from the batch)"
        )
    agg = "token-mean" if token_level else loss_agg_mode.removesuffix("-norm")
    if loss_agg_mode == "seq-mean-token-sum-norm":
        if count is None:
            count = float(aggregation_count(response_mask, agg))
        scale = global_batch_info.get("loss_scale_factor") or response_mask.shape[-1]
        return agg, float(count) * float(scale) / dp_size
    if count is None or float(count) <= 0:
        return agg, None  # own count (an empty global batch has zero loss, not nan)
    return agg, float(count) / dp_size


def _verl_metrics(m: Mapping[str, Tensor]) -> dict[str, float]:
    """rpgrl metrics under actor/rpg/*, plus verl's three standard PPO keys for dashboards:
    pg_clipfrac = upper + lower clip, pg_clipfrac_lower = dual clip, ppo_kl = mean(old - new)."""
    values = torch.stack([v.detach().double() for v in m.values()]).tolist()  # one device sync
    out = {f"actor/rpg/{k}": v for k, v in zip(m, values)}
    out["actor/pg_clipfrac"] = out["actor/rpg/clipfrac_upper"] + out["actor/rpg/clipfrac_lower"]
    out["actor/pg_clipfrac_lower"] = out["actor/rpg/clipfrac_dual"]
    out["actor/ppo_kl"] = -out["actor/rpg/kl_rollout_k1"]
    return out


def rollout_correction_weights(
    rollout_is_weights: Optional[Tensor], log_prob: Tensor, name: str = "rpgrl"
) -> Optional[Tensor]:
    """verl's ``rollout_is_weights`` as rpgrl's fixed per-token loss weights (None if absent).

    verl's ``algorithm.rollout_correction`` (decoupled mode) computes, once per batch,
    r = pi_old / pi_rollout from the trainer's recomputed ``old_log_probs`` and the rollout
    engine's ``rollout_log_probs`` (verl/trainer/ppo/rollout_corr_helper.py:522-657):
    ``rollout_is=token`` gives one r per token, ``sequence`` the product over the response
    broadcast to every token, both truncated at ``rollout_is_threshold`` (TIS) or zeroed
    outside ``"lower_upper"`` (IcePop), 0 on padding, optionally batch-normalized to mean 1.
    Rejection (``rollout_rs``) never reaches the loss as a weight: it zeroes the rejected
    tokens of ``response_mask`` (rollout_corr_helper.py:1060-1061), which is the loss's mask
    and the token count of its normalization.

    They correct the sampler -> pi_old gap that w = pi_theta / pi_old cannot see, so they
    multiply each token's whole loss as constants (as verl's own losses do,
    core_algos.py:1364-1365, and as rpgrl's TRL integration does with TRL's vLLM ratio),
    while the trust region, dual clip and KL term keep acting on w (docs/math.md §1, §3, §4.1).
    """
    if rollout_is_weights is None:
        return None
    if tuple(rollout_is_weights.shape) != tuple(log_prob.shape):
        raise ValueError(
            f"verl policy loss {name!r}: rollout_is_weights has shape {tuple(rollout_is_weights.shape)}, "
            f"expected the response shape {tuple(log_prob.shape)} (verl broadcasts sequence weights to tokens)"
        )
    return rollout_is_weights.detach().to(log_prob.dtype)


def _get(config: Any, key: str, default: Any = None) -> Any:
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


def make_policy_loss_fn(name: str) -> Callable[..., tuple[Tensor, dict[str, float]]]:
    """verl ``PolicyLossFn`` for rpgrl loss ``name`` (calls ``rpgrl.losses.policy_loss``)."""
    spec = LOSSES.resolve(name)  # UnknownLossError (a ValueError) says why not

    def rpg_policy_loss(
        old_log_prob: Tensor,
        log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: Optional[Tensor] = None,
    ) -> tuple[Tensor, dict[str, float]]:
        if config is None:
            raise ValueError(f"verl policy loss {name!r} needs the actor config (got config=None)")
        # verl's actor may produce bf16 log-probs (FSDP mixed precision); its own losses compute
        # in the promoted dtype of log_prob - old_log_prob. So does this one: in bf16, r = 1.0012
        # would round to 1.0 and the anchor's log-probs to 3 digits.
        compute = torch.promote_types(log_prob.dtype, old_log_prob.dtype)
        if log_prob.dtype != compute:
            log_prob = log_prob.to(compute)
        weights = rollout_correction_weights(rollout_is_weights, log_prob, name)
        if _get(config, "use_kl_loss", False) and _get(config, "kl_loss_coef", 0.0) != 0 and spec.divergence is not None:
            warnings.warn(
                f"actor.use_kl_loss=True adds verl's own KL term on top of {name!r}'s KL "
                f"regularizer; set actor_rollout_ref.actor.use_kl_loss=False (or kl_loss_coef=0) for RPG runs",
                stacklevel=2,
            )
        pl = _get(config, "policy_loss", {})
        beta, anchor = _get(pl, "beta", DEFAULT_BETA), _get(pl, "anchor", "rollout")
        _check_rpg_options(beta, anchor, "actor_rollout_ref.actor.policy_loss")
        anchor_logp = None  # rollout anchor = old_log_prob: docs/math.md §1.1, mode 1, rho = w, v = 1
        if anchor != "rollout":
            anchor_logp = _ANCHOR_LOG_PROB.get()
            if anchor_logp is None:
                raise ValueError(
                    f"verl policy loss {name!r}: actor_rollout_ref.actor.policy_loss.anchor={anchor!r} needs the "
                    f"reference log-probs, which verl's ppo_loss does not pass to a policy loss; run "
                    f"python -m rpgrl.integrations.verl_anchor (same overrides as verl.trainer.main_ppo) "
                    f"instead of verl.trainer.main_ppo, or use anchor=rollout"
                )
            anchor_logp = anchor_logp.to(log_prob.dtype)
            if tuple(anchor_logp.shape) != tuple(log_prob.shape):
                raise ValueError(f"verl policy loss {name!r}: ref_log_prob shape {tuple(anchor_logp.shape)} != "
                                 f"log_prob shape {tuple(log_prob.shape)}")
        clip_ratio = _get(config, "clip_ratio", 0.2)
        clip = (_get(config, "clip_ratio_low", clip_ratio), _get(config, "clip_ratio_high", clip_ratio))
        agg, norm = verl_normalization(
            response_mask, loss_agg_mode, _get(config, "global_batch_info", {})
        )
        loss, metrics = policy_loss(
            name, log_prob, old_log_prob, advantages, response_mask,
            anchor_logp=anchor_logp,
            beta=float(beta), clip=clip, dual_clip=float(_get(config, "clip_ratio_c", 3.0)),
            agg=agg, kl_in_advantage=bool(_get(pl, "kl_in_advantage", False)), norm=norm,
            weights=weights,
        )
        if weights is not None:  # proof on the dashboard that verl's weights reached the loss
            valid = response_mask.bool()
            metrics["rollout_is_weight_mean"] = (
                torch.where(valid, weights, 0.0).sum() / valid.sum().clamp(min=1)
            )
        return loss, _verl_metrics(metrics)

    rpg_policy_loss.__name__ = rpg_policy_loss.__qualname__ = f"rpgrl_{name}"
    rpg_policy_loss.__doc__ = f"rpgrl loss {name!r} as a verl PolicyLossFn: {spec.description}"
    return rpg_policy_loss


def rpg_outcome_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: np.ndarray,
    config: Any = None,
    **_: Any,
) -> tuple[Tensor, Tensor]:
    """verl advantage estimator ``rpg``: A = R - mean of the prompt's group (docs/math.md §5), via
    ``rpgrl.algorithm.advantages.compute_advantages``; R = sum of the token-level rewards, groups = uid.
    Returns (advantages, returns), both [B, T] and zero on padding, like verl's GRPO."""
    rewards = token_level_rewards.sum(dim=-1)
    group_ids = as_torch_index(index, device=rewards.device)
    adv = compute_advantages("rpg", rewards, group_ids, response_mask)
    return adv, adv


def _refresh_names() -> None:
    """Pick up ``rpgrl.losses`` entry points installed since import (names only)."""
    for name in LOSSES:
        VERL_LOSS_NAMES.setdefault(_verl_name(name), name)


def _register_one(verl_name: str, name: str) -> None:
    existing = core_algos.POLICY_LOSS_REGISTRY.get(verl_name)
    if existing is not None and existing.__module__ != __name__:
        raise ValueError(
            f"verl already has a policy loss named {verl_name!r} from {existing.__module__}; "
            f"rpgrl will not replace it"
        )
    core_algos.register_policy_loss(verl_name)(make_policy_loss_fn(name))


def register() -> list[str]:
    """Register every rpgrl loss (built-ins and installed ``rpgrl.losses`` entry points) and
    the ``rpg`` estimator in verl's registries (idempotent).

    Returns the registered verl ``loss_mode`` names. Refuses to replace a policy loss or an
    ``rpg`` estimator that another package registered under the same name. A plugin loss
    that fails to load is skipped with a warning (it must not break ``import verl``).
    """
    _refresh_names()
    done = []
    for verl_name, name in list(VERL_LOSS_NAMES.items()):
        if name in LOSSES.builtins:
            _register_one(verl_name, name)
        else:
            try:
                _register_one(verl_name, name)
            except UnknownLossError as exc:
                warnings.warn(f"rpgrl: plugin loss {name!r} not registered with verl: {exc}", stacklevel=2)
                continue
        done.append(verl_name)
    existing = core_algos.ADV_ESTIMATOR_REGISTRY.get("rpg")
    if existing is not None and existing.__module__ != __name__:
        raise ValueError(f"verl already has an advantage estimator 'rpg' from {existing.__module__}")
    # Written directly: verl's register_adv_est decorator rejects re-registering a new
    # function object, which would make a module reload fail.
    core_algos.ADV_ESTIMATOR_REGISTRY["rpg"] = rpg_outcome_advantage
    return done


# Importing this module is the plugin: the ``verl.plugins`` entry point and a
# ``policy_loss._target_`` pointing here both register the losses.
register()
