"""Advantage estimators (docs/math.md §5): one entry point ``compute_advantages``.

All estimators are vectorized over groups (no Python loop over prompts). Conventions, as in
verl's ``core_algos`` so that runs are comparable:

* A group of size 1 has baseline 0 and std 1 (verl: mean 0 / std 1 for a singleton), so its
  advantage is its reward (grpo: R / (1 + eps)). There is nothing to compare it with; this
  keeps its learning signal instead of silently zeroing it.
* Group std is the unbiased (n-1) std, as ``torch.std``. A group with identical rewards
  gets advantage 0 (grpo: 0 / (0 + eps)).
* Global whitening (REINFORCE++ variants) uses the mean and unbiased variance over all valid
  tokens of the batch: (x - mean) / sqrt(var + 1e-8).
* KL in the reward (``token_kl``, ``kl_coef``): REINFORCE++ subtracts ``kl_coef * token_kl``
  from every token reward before the return (docs/math.md §5). The outcome estimators (grpo, rpg,
  batch_mean, rloo, reinforce_pp_baseline) fold it at the sequence level,
  R_i <- R_i - kl_coef * sum_t token_kl_it (the t=0 return of the same token reward),
  before the baseline. With ``kl_coef = 0`` (the default) ``token_kl`` is ignored.

Output is [N, T], zero at masked positions. Under torchrun, ``global_advantages`` gives a
process the rows of its shard as if computed on the whole batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from rpgrl.parallel.distributed import DistContext

__all__ = [
    "ADVANTAGES",
    "GROUP_LOCAL",
    "compute_advantages",
    "global_advantages",
    "group_mean_std",
    "masked_whiten",
    "token_returns",
]

ADVANTAGES = ("grpo", "rpg", "batch_mean", "rloo", "reinforce_pp", "reinforce_pp_baseline")
#: Estimators whose value for a sequence depends only on its own group (docs/math.md §5), so a
#: process holding whole groups computes them exactly (``global_advantages``).
GROUP_LOCAL = ("grpo", "rpg", "rloo")

WHITEN_EPS = 1e-8


def group_mean_std(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-element group mean, unbiased std and group size (each [N]).

    Singleton groups get mean 0 and std 1 (verl's convention).
    """
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    counts_f = counts.to(rewards.dtype)
    sums = torch.zeros_like(counts_f).index_add_(0, inverse, rewards)
    mean = sums / counts_f
    sq = torch.zeros_like(counts_f).index_add_(0, inverse, (rewards - mean[inverse]).square())
    std = (sq / (counts_f - 1).clamp(min=1)).sqrt()
    single = counts == 1
    mean = torch.where(single, 0.0, mean)
    std = torch.where(single, 1.0, std)
    return mean[inverse], std[inverse], counts[inverse]


def masked_whiten(values: Tensor, valid: Tensor) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the valid entries (unbiased var), 0 elsewhere."""
    n = valid.sum()
    x = torch.where(valid, values, 0.0)
    mean = x.sum() / n.clamp(min=1)
    centered = torch.where(valid, values - mean, 0.0)
    var = centered.square().sum() / (n - 1).clamp(min=1)
    return centered * torch.rsqrt(var + WHITEN_EPS)


def token_returns(token_rewards: Tensor, valid: Tensor) -> Tensor:
    """Undiscounted (gamma = 1) reward-to-go over valid tokens: G_t = sum_{s >= t} r_s."""
    r = torch.where(valid, token_rewards, 0.0)
    return torch.where(valid, r.flip(-1).cumsum(-1).flip(-1), 0.0)


def _check(
    name: str, rewards: Tensor, group_ids: Tensor, mask: Tensor, token_kl: Optional[Tensor], eps: float
) -> None:
    if name not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {name!r}; expected one of {ADVANTAGES}")
    if rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(
            f"compute_advantages: rewards must be a float [N] tensor, got {rewards.dtype} "
            f"shape {tuple(rewards.shape)}"
        )
    n = rewards.shape[0]
    if tuple(group_ids.shape) != (n,) or group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(
            f"compute_advantages: group_ids must be an integer [N]=({n},) tensor, got "
            f"{group_ids.dtype} shape {tuple(group_ids.shape)}"
        )
    if mask.dim() != 2 or mask.shape[0] != n:
        raise ValueError(f"compute_advantages: mask must be [N, T] with N={n}, got {tuple(mask.shape)}")
    if token_kl is not None and token_kl.shape != mask.shape:
        raise ValueError(
            f"compute_advantages: token_kl shape {tuple(token_kl.shape)} != mask shape {tuple(mask.shape)}"
        )
    if not eps > 0:
        raise ValueError(f"compute_advantages: eps must be > 0, got {eps!r}")


def compute_advantages(
    name: str,
    rewards: Tensor,
    group_ids: Tensor,
    mask: Tensor,
    *,
    token_kl: Optional[Tensor] = None,
    kl_coef: float = 0.0,
    eps: float = 1e-6,
) -> Tensor:
    """Token advantages [N, T] of estimator ``name`` (one of ``ADVANTAGES``), docs/math.md §5.

    grpo: (R - mean_g) / (std_g + eps); rpg: R - mean_g (RPG's reference estimator);
    batch_mean: R - mean over the batch; rloo: R_i - mean of the other members of its group;
    reinforce_pp: whitened token returns of r_t = -kl_coef * token_kl_t plus R at the last
    valid token; reinforce_pp_baseline: R - mean_g broadcast to tokens, then whitened.
    """
    _check(name, rewards, group_ids, mask, token_kl, eps)
    valid = mask if mask.dtype == torch.bool else mask != 0
    rewards = rewards.detach()
    use_kl = token_kl is not None and kl_coef != 0
    kl = torch.where(valid, token_kl.detach().to(rewards.dtype), 0.0) if use_kl else None

    if name == "reinforce_pp":
        token_rewards = torch.zeros(valid.shape, dtype=rewards.dtype, device=rewards.device)
        if kl is not None:
            token_rewards = token_rewards - kl_coef * kl
        # The outcome reward sits on the last valid token of each response.
        positions = torch.arange(valid.shape[1], device=valid.device)
        last = torch.where(valid, positions, -1).amax(dim=1)
        has_tokens = last >= 0
        rows = torch.arange(valid.shape[0], device=valid.device)[has_tokens]
        token_rewards[rows, last[has_tokens]] += rewards[has_tokens]
        return masked_whiten(token_returns(token_rewards, valid), valid)

    if kl is not None:
        rewards = rewards - kl_coef * kl.sum(dim=1)
    if name == "batch_mean":
        seq_adv = rewards - rewards.mean()
    else:
        mean, std, counts = group_mean_std(rewards, group_ids)
        if name == "grpo":
            seq_adv = (rewards - mean) / (std + eps)
        elif name in ("rpg", "reinforce_pp_baseline"):
            seq_adv = rewards - mean
        else:  # rloo: R_i - (sum_g - R_i) / (n - 1) = n/(n-1) (R_i - mean_g); singleton: R_i
            n = counts.to(rewards.dtype)
            seq_adv = torch.where(counts > 1, (rewards - mean) * n / (n - 1).clamp(min=1), rewards)
    token_adv = torch.where(valid, seq_adv[:, None], 0.0)
    if name == "reinforce_pp_baseline":
        return masked_whiten(token_adv, valid)
    return token_adv


def global_advantages(
    ctx: "DistContext", name: str, rewards: Tensor, group_ids: Tensor, mask: Tensor, *,
    token_kl: Optional[Tensor] = None, kl_coef: float = 0.0,
) -> Tensor:
    """``compute_advantages`` as if on the whole batch of every process; returns this rank's rows.

    Group-local estimators run on the shard directly (groups are never split across
    processes). The others (batch_mean, reinforce_pp, reinforce_pp_baseline: a batch mean or
    a global whitening) gather rewards, masks padded to a common width, group ids made
    unique and ``token_kl`` from every rank in rank order, compute once, and keep the local rows.
    """
    if not ctx.enabled or name in GROUP_LOCAL:
        return compute_advantages(name, rewards, group_ids, mask, token_kl=token_kl, kl_coef=kl_coef)
    local = (rewards.cpu(), group_ids.cpu(), mask.cpu(), None if token_kl is None else token_kl.cpu())
    parts = ctx.all_gather_object(local)
    width = max(p[2].shape[1] for p in parts)
    pad = lambda t: F.pad(t, (0, width - t.shape[1]))  # noqa: E731 - masked positions are 0
    gids, offset = [], 0
    for p in parts:
        _, inverse = torch.unique(p[1], return_inverse=True)
        gids.append(inverse + offset)
        offset += int(inverse.max()) + 1 if inverse.numel() else 0
    kl = None if parts[0][3] is None else torch.cat([pad(p[3]) for p in parts])
    full = compute_advantages(
        name, torch.cat([p[0] for p in parts]), torch.cat(gids), torch.cat([pad(p[2]) for p in parts]),
        token_kl=kl, kl_coef=kl_coef,
    )
    start = sum(p[0].shape[0] for p in parts[:ctx.rank])
    return full[start:start + rewards.shape[0], :mask.shape[1]].to(rewards.device)
