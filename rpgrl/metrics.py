"""The names of the logged metrics (one place for the trainer, ``rpgrl.plots`` and
``rpgrl.compare``), how they combine over ranks, and the step-time breakdown.

Loss metrics are prefixed ``actor/`` + the loss's own ``METRIC_KEYS`` (spec Sec. 8: clip
fractions, KL to the anchor, importance weights).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

STEP = "step"
# per RL step (rpgrl.trainer)
LOSS = "actor/loss"
GRAD_NORM = "actor/grad_norm"
ENTROPY = "actor/entropy"
OPTIMIZER_STEPS = "actor/optimizer_steps"
SKIPPED_STEPS_TOTAL = "actor/skipped_steps_total"
KL_ANCHOR = "actor/kl_anchor_k3"
CLIPFRACS = ("actor/clipfrac_upper", "actor/clipfrac_lower", "actor/clipfrac_dual")
REWARD = "reward/mean"
SCORE_MEAN = "reward/score_mean"
ACCURACY = "reward/accuracy"
LENGTH_MEAN = "response_length/mean"
LENGTH_MAX = "response_length/max"
LENGTH_CLIP_RATIO = "response_length/clip_ratio"
GEN_BATCHES = "batch/gen_batches"
KEPT_GROUPS = "batch/kept_groups"
ANCHOR_REFRESHES = "anchor/refreshes"
LR = "optim/lr"
TIMING_STEP = "timing/step"
# per evaluation
EVAL_ACCURACY = "eval/accuracy"

#: Metrics summed over ranks (counts, and the loss: each rank's part shares the global
#: denominator); every other metric is averaged, except the ``MAX_METRICS``.
SUM_METRICS = (LOSS, KEPT_GROUPS, "reward/n", "reward/scorer_", "reward/empty_")
MAX_METRICS = (LENGTH_MAX,)


def actor(key: str) -> str:
    """The logged name of a loss metric (``rpgrl.losses.METRIC_KEYS``)."""
    return f"actor/{key}"


class StepTimer:
    """Seconds per phase of a step (trainer.profile / the overhead bar of the benchmarks)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self, total: float) -> dict[str, float]:
        out = {f"timing/{k}": v for k, v in self.seconds.items()}
        out[TIMING_STEP] = total
        out["timing/other"] = total - sum(self.seconds.values())
        return out


def profile_table(metrics_path: Path) -> str:
    """trainer.profile: mean seconds per phase over steps 2..N (step 1 carries warm-up costs)."""
    import numpy as np

    from rpgrl.tracking import read_metrics

    rows = [r for r in read_metrics(metrics_path) if TIMING_STEP in r and r[STEP] > 1]
    if not rows:
        return "profile: fewer than 2 steps, nothing to report"
    keys = sorted({k for r in rows for k in r if k.startswith("timing/")})
    means = {k: float(np.mean([r.get(k, 0.0) for r in rows])) for k in keys}
    step = means.pop(TIMING_STEP)
    lines = [f"step-time breakdown (mean over steps 2..{rows[-1][STEP]}):"]
    lines += [f"  {k[7:]:<18}{v:8.4f} s {100 * v / step:5.1f} %" for k, v in sorted(means.items(), key=lambda kv: -kv[1])]
    lines.append(f"  {'step':<18}{step:8.4f} s")
    return "\n".join(lines)
