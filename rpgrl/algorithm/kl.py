"""Per-token KL estimators k1, k2, k3 (docs/math.md §2 and App. D of the paper).

Every estimator is a pure function of ``(logp, ref_logp)`` in log space and estimates
KL(pi || pi_ref) for tokens sampled from pi (Schulman's convention), with
``r = pi_ref / pi = exp(ref_logp - logp)``:

* k1 = -log r                    (unbiased, high variance, can be negative)
* k2 = (log r)^2 / 2             (biased, low variance, >= 0)
* k3 = r - 1 - log r             (>= 0; E_pi[k3] = UKL(pi || pi_ref), App. D)

k3 is what GRPO adds to its loss (docs/math.md §5) and what REINFORCE++ folds into the
token reward with ``kl_penalty``. The log ratio is clamped to +-``LOG_RATIO_MAX`` so that
``exp`` never overflows (float32 overflows at exp(88)); inside that range the values and
gradients are exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LOG_RATIO_MAX", "KL_KINDS", "k1", "k2", "k3", "k3_from_log_ratio", "kl_penalty"]

#: Log ratios are clamped to [-LOG_RATIO_MAX, LOG_RATIO_MAX] (ratio <= 4.85e8), as verl does.
LOG_RATIO_MAX = 20.0

KL_KINDS = ("k1", "k2", "k3")


def _log_ratio(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """log(pi / pi_ref), clamped for numerical safety."""
    return (logp - ref_logp).clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)


def k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log pi - log pi_ref: unbiased estimate of KL(pi || pi_ref) for samples from pi."""
    return _log_ratio(logp, ref_logp)


def k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = (log pi - log pi_ref)^2 / 2: low-variance, biased, non-negative."""
    return 0.5 * _log_ratio(logp, ref_logp).square()


def k3_from_log_ratio(log_ratio: Tensor) -> Tensor:
    """k3 given ``log_ratio = log(pi / pi_ref)``: exp(-x) - 1 + x, via expm1 for accuracy.

    Equals k3(y) = y - 1 - log y at y = pi_ref / pi [App. D]; non-negative, and 0 iff pi = pi_ref.
    """
    return torch.expm1(-log_ratio) + log_ratio


def k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3(pi_ref / pi) = pi_ref/pi - 1 - log(pi_ref/pi); E_pi[k3] = UKL(pi || pi_ref) [App. D]."""
    return k3_from_log_ratio(_log_ratio(logp, ref_logp))


_ESTIMATORS = {"k1": k1, "k2": k2, "k3": k3}


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k1") -> Tensor:
    """Per-token KL estimate of ``kind`` ("k1", "k2" or "k3"), e.g. to fold into the reward.

    REINFORCE++ (docs/math.md §5) uses ``kind="k1"`` on the token reward:
    ``r_t -= kl_coef * kl_penalty(logp, ref_logp)`` (see ``rpgrl.algorithm.advantages``).
    """
    try:
        fn = _ESTIMATORS[kind]
    except KeyError:
        raise ValueError(f"unknown KL estimator kind={kind!r}; expected one of {KL_KINDS}") from None
    if logp.shape != ref_logp.shape:
        raise ValueError(
            f"kl_penalty: logp shape {tuple(logp.shape)} != ref_logp shape {tuple(ref_logp.shape)}"
        )
    return fn(logp, ref_logp)
