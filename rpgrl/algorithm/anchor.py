"""KL anchors and the iterative reference (docs/math.md §1.1).

``rollout``: the anchor is pi_old of the current batch, so its log-probs are the stored
rollout log-probs and no second model exists (the reference code's default).
``periodic``/``adaptive``: a frozen snapshot refreshed every K optimizer steps, or when a
moving average of the token KL to the anchor exceeds kappa. ``fixed``: the initial policy,
never refreshed (GRPO's reference model). K counts optimizer steps, as in docs/math.md §1.1: when a
refresh falls due inside a batch (several mini-batches per batch), the trainer refreshes
right after that optimizer step and recomputes the anchor log-probs of the mini-batches still
to come; one due after a batch's last step is taken at the next batch, before its anchor
log-probs are computed (the policy does not change in between).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


#: The anchor modes of docs/math.md §1.1.
ANCHOR_MODES = ("rollout", "periodic", "adaptive", "fixed")


@dataclass
class Anchor:
    mode: str
    period: int = 20
    kappa: float = 0.05
    ema: float = 0.9
    model: torch.nn.Module | None = None
    steps_since_refresh: int = 0
    kl_ema: float | None = None
    refreshes: int = 0
    _due: bool = field(default=False, repr=False)

    @classmethod
    def create(cls, mode: str, policy: torch.nn.Module, *, period: int = 20, kappa: float = 0.05,
               ema: float = 0.9) -> "Anchor":
        if mode not in ANCHOR_MODES:
            raise ValueError(f"anchor mode {mode!r}: expected one of {', '.join(ANCHOR_MODES)}")
        from rpgrl.models.loading import frozen_copy  # (lazy: rpgrl.config reads ANCHOR_MODES)

        snapshot = None if mode == "rollout" else frozen_copy(policy)
        return cls(mode=mode, period=period, kappa=kappa, ema=ema, model=snapshot)

    @property
    def uses_rollout(self) -> bool:
        return self.model is None

    @property
    def due(self) -> bool:
        """A refresh is pending (the next :meth:`maybe_refresh` copies the policy)."""
        return self._due and self.model is not None

    def observe(self, kl_to_anchor: float) -> None:
        """Record one optimizer step and the KL to the anchor measured during it."""
        self.steps_since_refresh += 1
        self.kl_ema = kl_to_anchor if self.kl_ema is None else (
            self.ema * self.kl_ema + (1 - self.ema) * kl_to_anchor)
        if self.mode == "periodic" and self.steps_since_refresh >= self.period:
            self._due = True
        if self.mode == "adaptive" and self.kl_ema > self.kappa:
            self._due = True

    def maybe_refresh(self, policy: torch.nn.Module) -> bool:
        """Copy the current policy into the snapshot if a refresh is due (after an optimizer
        step or at a batch boundary); True when it did."""
        if not self._due or self.model is None:
            return False
        self.model.load_state_dict(policy.state_dict())
        self._due = False
        self.steps_since_refresh = 0
        self.kl_ema = None
        self.refreshes += 1
        return True

    def state_dict(self) -> dict:
        state = {"steps_since_refresh": self.steps_since_refresh, "refreshes": self.refreshes,
                 "kl_ema": -1.0 if self.kl_ema is None else float(self.kl_ema), "due": self._due}
        if self.model is not None:
            state["weights"] = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.steps_since_refresh = int(state["steps_since_refresh"])
        self.refreshes = int(state["refreshes"])
        self.kl_ema = None if state["kl_ema"] < 0 else float(state["kl_ema"])
        self._due = bool(state["due"])
        if self.model is not None:
            self.model.load_state_dict(state["weights"])
