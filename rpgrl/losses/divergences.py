"""The table of KL terms (docs/math.md §2-5): one row per divergence, no per-loss code.

Each row gives, as functions of beta, the importance weight ``w = pi_theta/pi_old``, the
anchor log-ratio ``log_rho = log(pi_theta/pi_anc)``, the constant ``v = pi_anc/pi_old`` and
the current log-prob ``logp``:

* ``kl_weight``: C_KL, the KL part of the per-token gradient weight g_t = w*A + C_KL, so
  that grad J = E_old[g_t * grad logp_t] (docs/math.md §2 / §4.1; Props. E.1, E.3, 3.2, 3.6
  with v = 1, rho = w).
* ``kl_loss``: beta * S, the differentiable KL loss term (loss = -w*A + beta*S), whose
  autograd gradient is exactly -C_KL * grad logp (docs/math.md §3; Table 1 / Table 4).

The REINFORCE kernel consumes ``kl_weight``; the differentiable kernel consumes ``kl_loss``
(and ``kl_weight`` for Algorithm 1's KL-in-advantage option). GRPO's KL terms (docs/math.md
§5) are extra rows with a loss only: they are not RPG gradients.
``v`` is the float 1.0 when the anchor is the rollout policy, which skips work. beta is
folded into each expression (``addcmul``/in-place ops) because every elementwise pass over
a [B, T] batch costs time (benchmarks/bench_losses.py); the plain formulas are in comments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from rpgrl.algorithm.kl import k3_from_log_ratio

__all__ = ["Divergence", "DIVERGENCES", "GRPO_KL", "GRPO_KL_CORRECTED"]

Scalar = Union[Tensor, float]


@dataclass(frozen=True)
class Divergence:
    """One KL regularizer: D (for docs), its gradient weight C_KL and its loss term beta*S."""

    name: str
    D: str
    kl_weight: Optional[Callable[[float, Tensor, Tensor, Scalar], Scalar]]
    kl_loss: Callable[[float, Tensor, Tensor, Scalar, Tensor], Tensor]
    coefficient: str = ""  # C_KL in words (the KL part of g_t), printed by ``rpgrl explain``
    #: the KL term's per-token gradient weight for rows without an RPG ``kl_weight`` (GRPO's):
    #: the loss term's gradient is -grad_weight * grad logp. Only the ``kl_share`` metric uses it.
    grad_weight: Optional[Callable[[float, Tensor, Tensor, Scalar], Scalar]] = None

    def gradient_weight(self, beta: float, w: Tensor, log_rho: Tensor, v: Scalar) -> Scalar:
        """The KL term's per-token gradient weight C_KL (the KL part of g_t)."""
        fn = self.kl_weight or self.grad_weight
        assert fn is not None, f"divergence {self.name} has no gradient weight"
        return fn(beta, w, log_rho, v)


# ---- C_KL(beta, w, log_rho, v): g = w*A + C_KL (docs/math.md §2 / §4.1) -------------
def _fkl_weight(beta: float, w: Tensor, log_rho: Tensor, v: Scalar) -> Scalar:
    return beta * v  # Prop. E.1: g = wA + beta


def _rkl_weight(beta: float, w: Tensor, log_rho: Tensor, v: Scalar) -> Tensor:
    return torch.addcmul(w * -beta, w, log_rho, value=-beta)  # -beta w (log rho + 1); Prop. E.3


def _ufkl_weight(beta: float, w: Tensor, log_rho: Tensor, v: Scalar) -> Tensor:
    if isinstance(v, Tensor):
        return (v - w).mul_(beta)  # beta (v - w)
    return (w * -beta).add_(beta * v)  # Prop. 3.2: -beta (w - 1)


def _urkl_weight(beta: float, w: Tensor, log_rho: Tensor, v: Scalar) -> Tensor:
    return (w * log_rho).mul_(-beta)  # Prop. 3.6: -beta w log w


# ---- beta*S(w, log_rho, v, logp), differentiable: loss = -w*A + beta*S (docs/math.md §3) -
def _fkl_loss(beta: float, w: Tensor, log_rho: Tensor, v: Scalar, logp: Tensor) -> Tensor:
    return logp * (-beta * v)  # Table 1: -beta v log pi_theta


def _rkl_loss(beta: float, w: Tensor, log_rho: Tensor, v: Scalar, logp: Tensor) -> Tensor:
    return (w * log_rho).mul_(beta)  # Table 1: beta w log rho


def _ufkl_loss(beta: float, w: Tensor, log_rho: Tensor, v: Scalar, logp: Tensor) -> Tensor:
    if isinstance(v, Tensor):
        return torch.addcmul(w * beta, v, logp, value=-beta)  # beta (w - v log pi_theta)
    return torch.add(w * beta, logp, alpha=-beta * v)  # Table 1: beta (w - log w), consts dropped


def _urkl_loss(beta: float, w: Tensor, log_rho: Tensor, v: Scalar, logp: Tensor) -> Tensor:
    return torch.addcmul(w * -beta, w, log_rho, value=beta)  # Table 1: beta (w log rho - w)


def _grpo_k3_loss(beta: float, w: Tensor, log_rho: Tensor, v: Scalar, logp: Tensor) -> Tensor:
    return k3_from_log_ratio(log_rho).mul_(beta)  # beta k3(pi_ref/pi_theta), not weighted


def _grpo_k3_corrected_loss(beta: float, w: Tensor, log_rho: Tensor, v: Scalar, logp: Tensor) -> Tensor:
    return (w * beta) * k3_from_log_ratio(log_rho)  # beta w k3: gradient beta w log rho = URKL's


def _grpo_k3_grad(beta: float, w: Tensor, log_rho: Tensor, v: Scalar) -> Tensor:
    # d/dlogp of beta k3(y), y = pi_ref/pi_theta = e^-log_rho: beta (1 - y), so C = beta (y - 1)
    return torch.expm1(-log_rho).mul_(beta)


def _grpo_k3_corrected_grad(beta: float, w: Tensor, log_rho: Tensor, v: Scalar) -> Tensor:
    return _urkl_weight(beta, w, log_rho, v)  # d/dlogp of beta w k3 = beta w log rho


DIVERGENCES: dict[str, Divergence] = {
    "fkl": Divergence("fkl", "KL(pi_anc || pi_theta)", _fkl_weight, _fkl_loss, "beta*v"),
    "rkl": Divergence("rkl", "KL(pi_theta || pi_anc)", _rkl_weight, _rkl_loss,
                      "-beta*w*(log rho + 1)"),
    "ufkl": Divergence(
        "ufkl", "KL(pi_anc || pi_theta) + int(pi_theta - pi_anc)", _ufkl_weight, _ufkl_loss,
        "-beta*(w - v)",
    ),
    "urkl": Divergence(
        "urkl", "KL(pi_theta || pi_anc) + int(pi_anc - pi_theta)", _urkl_weight, _urkl_loss,
        "-beta*w*log rho",
    ),
}

#: GRPO's KL loss term beta*k3(pi_ref/pi_theta) (docs/math.md §5): biased off-policy.
GRPO_KL = Divergence("grpo_k3", "k3(pi_ref/pi_theta), uncorrected", None, _grpo_k3_loss,
                     "beta*(pi_ref/pi_theta - 1) (no w)", grad_weight=_grpo_k3_grad)
#: The paper's fix beta*w*k3(pi_ref/pi_theta): its gradient is URKL's (docs/math.md §5).
GRPO_KL_CORRECTED = Divergence(
    "grpo_w_k3", "w * k3(pi_ref/pi_theta)", None, _grpo_k3_corrected_loss, "-beta*w*log rho",
    grad_weight=_grpo_k3_corrected_grad,
)
