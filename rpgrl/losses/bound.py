"""A registered loss with its hyperparameters fixed once (docs/math.md §3-6).

The trainer binds the loss from the config at start-up, where the hyperparameters are
validated once with a named error; each micro-batch then passes tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from torch import Tensor

from rpgrl.losses.policy import apply_loss, check_hyperparameters
from rpgrl.losses.spec import LossSpec


@dataclass(frozen=True)
class BoundLoss:
    """``policy_loss(name, ...)`` with ``beta``, the trust region (``clip``, ``dual_clip``),
    ``agg`` and ``kl_in_advantage`` fixed; see :func:`rpgrl.losses.policy_loss`."""

    name: str
    beta: float
    clip: Optional[tuple[float, float]]
    dual_clip: Optional[float]
    agg: str
    kl_in_advantage: bool = False

    def __post_init__(self) -> None:  # resolved and validated once, here
        spec = check_hyperparameters(self.name, self.beta, self.clip, self.dual_clip, self.agg,
                                     self.kl_in_advantage)
        object.__setattr__(self, "_spec", spec)

    @property
    def spec(self) -> LossSpec:
        return self._spec

    def __call__(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                 anchor_logp: Optional[Tensor] = None, *,
                 norm: Optional[Union[float, Tensor]] = None) -> tuple[Tensor, dict[str, Tensor]]:
        return apply_loss(self._spec, logp, old_logp, advantages, mask, anchor_logp, self.beta, self.clip,
                          self.dual_clip, self.agg, kl_in_advantage=self.kl_in_advantage, norm=norm)
