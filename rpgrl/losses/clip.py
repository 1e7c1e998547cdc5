"""The trust region shared by both kernels: ratio clip + dual clip (docs/math.md §3 and §4.1).

PPO's clip, the dual clip of Algorithm 1 and the RPG-Style Clip of Algorithm 2 all make the
same per-token decision: given the sign of the (effective) advantage and the importance
weight w, either the gradient flows through w, or w is replaced by a constant k:

    sign >= 0 and w >= 1 + eps_high  -> k = 1 + eps_high   ("upper")
    sign <  0 and w <= 1 - eps_low   -> k = 1 - eps_low    ("lower")
    sign <  0 and w >= c             -> k = c              ("dual", c > 1)

For the differentiable loss -A*w this reproduces PPO's
``max(-wA, -clip(w)A)`` / ``min(., -cA)`` exactly (values and gradients); for the REINFORCE
loss (Algorithm 2) the sign is that of psi = A' * nll and the same constants appear in
its constant branches. Boundaries follow Algorithm 2 (w = 1+eps_high is clipped,
w = 1-eps_low is clipped, w = c is clipped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["TrustRegion", "trust_region"]


@dataclass
class TrustRegion:
    """``ratio`` = w where the gradient flows, the clip constant elsewhere; bool masks of the
    three clipped cases and their union ``stopped`` (None when that clip is off)."""

    ratio: Tensor
    upper: Optional[Tensor] = None
    lower: Optional[Tensor] = None
    dual: Optional[Tensor] = None
    stopped: Optional[Tensor] = None


def trust_region(
    nonneg: Tensor,
    w: Tensor,
    clip: Optional[tuple[float, float]],
    dual_clip: Optional[float],
) -> TrustRegion:
    """Clip the importance weight ``w`` (may carry grad) given the advantage sign ``nonneg``.

    Returns ``ratio`` such that ``-A * ratio`` is the dual-clip PPO term [Algorithm 1] and
    ``(ratio*A + C_KL) * nll`` with stopped nll is RPG-Style Clip [Algorithm 2]. The gradient
    flows through ``ratio`` only where it equals ``w``.
    """
    ratio = w
    region = TrustRegion(ratio)
    if clip is None and dual_clip is None:
        return region
    wd = w.detach()
    if clip is not None:
        eps_low, eps_high = clip
        region.upper = nonneg & (wd >= 1.0 + eps_high)
        region.lower = (wd <= 1.0 - eps_low) & ~nonneg
        ratio = torch.where(region.upper, 1.0 + eps_high, ratio)
        ratio = torch.where(region.lower, 1.0 - eps_low, ratio)
    if dual_clip is not None:
        region.dual = (wd >= dual_clip) & ~nonneg
        ratio = torch.where(region.dual, float(dual_clip), ratio)
    region.ratio = ratio
    masks = [m for m in (region.upper, region.lower, region.dual) if m is not None]
    region.stopped = masks[0]
    for m in masks[1:]:
        region.stopped = region.stopped | m
    return region
