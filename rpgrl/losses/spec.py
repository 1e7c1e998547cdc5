"""The loss contract: what every loss function receives (``LossInputs``) and how a loss is
registered (``LossSpec``). Built-in and user losses have the same signature:

    def my_loss(x: LossInputs) -> Tensor | tuple[Tensor, TrustRegion]

It returns the [B, T] per-token loss (to minimise), optionally with the ``TrustRegion``
whose masks feed the clip metrics and ``rpgrl check-loss``'s clip-region checks. Masking
and aggregation (docs/math.md §6) are done by ``policy_loss`` afterwards, identically for
every loss and every trainer: masked positions are zeroed with ``torch.where`` and the sum
is divided by the mini-batch's count, so a loss never sees ``agg`` or ``norm``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

from torch import Tensor

from rpgrl.losses.clip import TrustRegion
from rpgrl.losses.divergences import Divergence
from rpgrl.losses.surrogates import Ratios, importance_ratios

__all__ = ["LossInputs", "LossSpec", "TokenLossFn", "TokenLossOut"]

TokenLossOut = Union[Tensor, "tuple[Tensor, Optional[TrustRegion]]"]
TokenLossFn = Callable[["LossInputs"], TokenLossOut]


@dataclass
class LossInputs:
    """Everything a loss may use, already validated by ``policy_loss`` (all [B, T]).

    logp: log pi_theta of the sampled tokens (requires grad); old_logp: log pi_old, the
    policy that sampled (detached); advantages: detached, 0 at masked positions;
    mask: bool, True = a response token; anchor_logp: the KL anchor pi_anc (detached) or
    None when the anchor is the rollout policy (docs/math.md §1.1: then rho = w, v = 1);
    beta, clip = (eps_low, eps_high) or None, dual_clip = c or None, kl_in_advantage: the
    configured algorithm's options. Masked positions of logp/old_logp/anchor_logp may hold
    anything (even inf/nan): use ``ratios()`` or ``torch.where(x.mask, ..., 0)`` before exp.
    """

    logp: Tensor
    old_logp: Tensor
    advantages: Tensor
    mask: Tensor
    anchor_logp: Optional[Tensor] = None
    beta: float = 0.0
    clip: Optional[tuple[float, float]] = None
    dual_clip: Optional[float] = None
    kl_in_advantage: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    def ratios(self, grad: bool = True) -> Ratios:
        """w = pi_theta/pi_old, log_rho = log(pi_theta/pi_anc), v = pi_anc/pi_old (docs/math.md §1),
        masked (0 log-ratio at padding) and clamped; differentiable in logp iff ``grad``.
        Cached, so a loss and the metrics share one computation."""
        if grad not in self._cache:
            lp = self.logp if grad else self.logp.detach()
            self._cache[grad] = importance_ratios(lp, self.old_logp, self.anchor_logp, self.mask)
        return self._cache[grad]

    def detached_ratios(self) -> Ratios:
        """The ratios for metrics: the loss's own if it computed them, else a detached pass."""
        if True in self._cache:
            r = self._cache[True]
            v = r.v.detach() if isinstance(r.v, Tensor) else r.v
            return Ratios(r.log_w.detach(), r.w.detach(), r.log_rho.detach(), v)
        return self.ratios(grad=False)


#: What a loss may claim to be the exact gradient of: J = E[R] - beta*D for D one of these
#: (docs/math.md §2), or "none" (no KL term).
OBJECTIVES = ("none", "fkl", "rkl", "ufkl", "urkl")


@dataclass(frozen=True)
class LossSpec:
    """A registered loss. ``token_loss`` has the contract of the module docstring.

    kernel: "differentiable" | "reinforce" (the RPG kernels, docs/math.md §3 / §4), "gspo", "cispo",
    or "plugin"; divergence: the KL row the RPG kernels use (None = no KL term);
    objective: the divergence D of J = E[R] - beta*D whose gradient the loss claims
    ("fkl", "rkl", "ufkl", "urkl", or "none" for no KL term; None = it claims nothing),
    which ``rpgrl check-loss`` proves by default; uses_dual_clip / uses_beta: whether the
    loss reads those options (shown by ``rpgrl explain``); note: a caveat worth printing;
    source: "built-in", "entry point <value>" or "path <module:function>"; coefficient: the
    per-token gradient weight g_t (update = g_t * grad log pi_theta) in words, for explain.
    """

    name: str
    kernel: str
    divergence: Optional[Divergence]
    description: str
    token_loss: TokenLossFn = field(compare=False, repr=False)
    objective: Optional[str] = None
    uses_beta: bool = True
    uses_dual_clip: bool = True
    note: str = ""
    source: str = "built-in"
    coefficient: str = ""

    @property
    def supports_kl_in_advantage(self) -> bool:
        """Algorithm 1's KL-in-advantage option needs an RPG gradient weight C_KL."""
        return (
            self.kernel == "differentiable"
            and self.divergence is not None
            and self.divergence.kl_weight is not None
        )
