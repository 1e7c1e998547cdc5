"""Overlong reward shaping of DAPO (docs/math.md §7).

A response of length L longer than ``max_len - buffer_len`` is penalised linearly:
``min(0, -(L - (max_len - buffer_len)) / buffer_len * penalty_factor)``, reaching
``-penalty_factor`` at ``L = max_len``. The soft ramp tells the policy *how far* over the
budget it went, instead of the cliff of a truncation-is-wrong rule.
"""

from __future__ import annotations

import torch

__all__ = ["overlong_penalty"]


def overlong_penalty(lengths: torch.Tensor | list[int], max_len: int, buffer_len: int,
                     penalty_factor: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-response penalty (<= 0) to add to the reward; 0 when ``buffer_len == 0`` (off).

    ``lengths``: response lengths in tokens (1-D tensor or list). Returns a tensor of the
    same shape (on the same device as a tensor input).
    """
    if max_len <= 0:
        raise ValueError(f"overlong_penalty: max_len must be > 0, got {max_len}")
    if not 0 <= buffer_len <= max_len:
        raise ValueError(f"overlong_penalty: buffer_len must be in [0, max_len={max_len}], got {buffer_len}")
    if penalty_factor < 0:
        raise ValueError(f"overlong_penalty: penalty_factor must be >= 0, got {penalty_factor}")
    lengths_t = torch.as_tensor(lengths)
    if buffer_len == 0:
        return torch.zeros(lengths_t.shape, dtype=dtype, device=lengths_t.device)
    exceed = lengths_t.to(dtype) - (max_len - buffer_len)
    return torch.clamp(-exceed / buffer_len * penalty_factor, max=0.0)
