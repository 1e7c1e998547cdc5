"""Loss aggregation over the mini-batch (docs/math.md §6).

With gradient accumulation, pass ``norm`` = the whole mini-batch's count (from
``aggregation_count`` summed over micro-batches): then the sum of the micro-batch losses
equals the whole mini-batch's loss and gradients accumulate exactly.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["AGG_MODES", "aggregate", "aggregation_count"]

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


def aggregation_count(mask: Tensor, agg: str) -> Tensor:
    """The denominator ``agg`` uses for this batch: valid tokens (token-mean) or sequences
    with at least one valid token (seq-mean-*). Sum it over micro-batches to get ``norm``."""
    valid = mask if mask.dtype == torch.bool else mask != 0
    if agg == "token-mean":
        return valid.sum()
    if agg in AGG_MODES:
        return valid.any(dim=-1).sum()
    raise ValueError(f"unknown agg={agg!r}; expected one of {AGG_MODES}")


def aggregate(
    token_loss: Tensor, valid: Tensor, agg: str = "token-mean", norm: Optional[Union[float, Tensor]] = None
) -> Tensor:
    """Reduce a [B, T] token loss (already zero at masked positions) to a scalar.

    token-mean: sum / token count; seq-mean-token-sum: sum_i (sum_t loss) / seq count;
    seq-mean-token-mean: sum_i (mean_t loss) / seq count. ``norm`` overrides the count
    (never the per-sequence token mean, which is always the sequence's own length).
    """
    if agg in ("token-mean", "seq-mean-token-sum"):
        total = token_loss.sum()  # for seq-mean-token-sum, sum_i sum_t == sum over all tokens
    elif agg == "seq-mean-token-mean":
        lengths = valid.sum(dim=-1).clamp(min=1).to(token_loss.dtype)
        total = (token_loss.sum(dim=-1) / lengths).sum()
    else:
        raise ValueError(f"unknown agg={agg!r}; expected one of {AGG_MODES}")
    if norm is None:
        denom = aggregation_count(valid, agg).clamp(min=1).to(token_loss.dtype)
    else:
        denom = norm
    return total / denom
