"""What a run carries from one RL step to the next, besides the weights and the optimizer's
tensors: the state a checkpoint's ``trainer_state.pt`` holds.

The trainer owns one ``TrainState`` and updates it as it goes; checkpoint I/O
(``rpgrl.loop.run_state``) saves and restores it through ``state_dict`` / ``load_state_dict`` and
never touches the trainer. The model and optimizer tensors are written next to it by the
parallel strategy (``rpgrl.parallel.strategy``: under FSDP they must be gathered first).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from rpgrl.algorithm.anchor import Anchor
from rpgrl.loop.checkpoint import CheckpointError, capture_rng_state, restore_rng_state
from rpgrl.loop.eval_metrics import BestLastTracker
from rpgrl.loop.prompt_order import PromptOrder

__all__ = ["STATE_KEYS", "TrainState"]

#: The keys of ``state_dict()`` (the format of ``trainer_state.pt``; ``rng_per_rank`` is
#: added under torchrun). Checkpoints written before ``TrainState`` existed have the same keys.
STATE_KEYS = ("step", "sampler", "rng", "scheduler", "anchor", "skipped_total", "consecutive_skips",
              "eval_before", "best_last")


@dataclass
class TrainState:
    """Step count, prompt order, LR schedule, anchor, non-finite-step counters, the
    evaluations so far and the RNG states; ``started`` (wall clock of this process, for
    ``summary.json``) is not checkpointed."""

    prompt_order: PromptOrder
    anchor: Anchor
    scheduler: Any | None = None  # torch LR scheduler, or None for a constant LR
    step: int = 0
    consecutive_skips: int = 0
    skipped_total: int = 0
    eval_before: dict | None = None
    best_last: BestLastTracker = field(default_factory=BestLastTracker)
    started: float = field(default_factory=time.perf_counter)

    def record_optimizer_step(self, finite: bool) -> None:
        """Count a taken (finite) or skipped (non-finite gradient) optimizer step."""
        if finite:
            self.consecutive_skips = 0
        else:
            self.consecutive_skips += 1
            self.skipped_total += 1

    def state_dict(self, rng_per_rank: list[dict] | None = None) -> dict:
        """Plain types and tensors (``torch.load(weights_only=True)`` reads them back); the
        RNG state is this process's, ``rng_per_rank`` every process's under torchrun."""
        state = {
            "step": self.step, "sampler": self.prompt_order.state_dict(), "rng": capture_rng_state(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "anchor": self.anchor.state_dict(), "skipped_total": self.skipped_total,
            "consecutive_skips": self.consecutive_skips, "eval_before": json.dumps(self.eval_before),
            "best_last": json.dumps(self.best_last.to_dict()),
        }
        if rng_per_rank is not None:
            state["rng_per_rank"] = rng_per_rank
        return state

    def load_state_dict(self, state: dict, *, rank: int = 0, world_size: int = 1, source: str = "trainer_state") -> bool:
        """Restore everything, and this process's RNG state when the checkpoint has one for
        it (same number of processes); False when it has not, so the caller reseeds.
        ``source`` (the file) names where a missing key was expected."""
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise CheckpointError(f"{source}: missing {', '.join(missing)}; a trainer state holds {', '.join(STATE_KEYS)}")
        self.step = int(state["step"])
        self.prompt_order.load_state_dict(state["sampler"])
        if self.scheduler is not None and state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        self.anchor.load_state_dict(state["anchor"])
        self.skipped_total, self.consecutive_skips = int(state["skipped_total"]), int(state["consecutive_skips"])
        self.eval_before = json.loads(state["eval_before"])
        self.best_last = BestLastTracker.from_dict(json.loads(state["best_last"]))
        if world_size == 1:
            restore_rng_state(state["rng"])
            return True
        per_rank = state.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == world_size:
            restore_rng_state(per_rank[rank])
            return True
        return False
