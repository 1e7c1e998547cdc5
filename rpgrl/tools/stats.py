"""Seed statistics of ``rpgrl compare``: t-intervals, paired differences, the verdict.

With 3-5 seeds a mean ± std hides how little is known; a 95 % Student-t interval says it
(with 3 seeds the half-width is 2.48 standard deviations). Methods are compared *paired
by seed*: seed k of every method starts from the same policy with the same prompt stream
and random streams, so the per-seed difference removes what the seeds share and its interval is the
honest "beyond seed noise" test. The t quantiles come from ``scipy.stats.t``; the declared tests of a
pre-registered plan are in ``rpgrl.tools.hypotheses``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

__all__ = ["Interval", "paired_difference", "t_interval", "verdict"]


# --------------------------------------------------------------------------- intervals


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with a two-sided ``level`` t-interval; lo/hi are nan for n < 2."""

    mean: float
    lo: float
    hi: float
    n: int
    std: float  # sample std (ddof=1); nan for n < 2
    level: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2.0

    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely above or entirely below 0 (needs n >= 2)."""
        return math.isfinite(self.lo) and (self.lo > 0 or self.hi < 0)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean ± t_{(1+level)/2, n-1} * s / sqrt(n) over the finite ``values``."""
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    n = len(vals)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, math.nan, level)
    mean = math.fsum(vals) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1, math.nan, level)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
    from rpgrl.tools.hypotheses import _scipy_stats

    half = float(_scipy_stats().t.ppf(0.5 + level / 2.0, n - 1)) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, std, level)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> Interval:
    """t-interval of a[seed] - b[seed] over the seeds both have (finite on both sides)."""
    seeds = sorted(s for s in set(a) & set(b) if math.isfinite(a[s]) and math.isfinite(b[s]))
    return t_interval([a[s] - b[s] for s in seeds], level)


# --------------------------------------------------------------------------- the verdict


def _claim(diff: Interval | None, better: str, worse: str) -> tuple[str, str]:
    """(outcome, text) of "better >= worse": outcome is one of holds / reversed / within-noise /
    too-few-seeds / missing."""
    if diff is None or diff.n == 0:
        return "missing", f"{better} vs {worse}: no paired seeds"
    pts = f"{100 * diff.mean:+.1f} pts"
    if diff.n < 2:
        return "too-few-seeds", f"{better} - {worse} = {pts} on 1 seed (no interval)"
    ci = f"{pts}, 95% CI [{100 * diff.lo:+.1f}, {100 * diff.hi:+.1f}], {diff.n} seeds"
    if diff.lo > 0:
        return "holds", f"{better} > {worse} beyond seed noise ({ci})"
    if diff.hi < 0:
        return "reversed", f"{better} < {worse} beyond seed noise ({ci})"
    return "within-noise", f"{better} vs {worse} within seed noise ({ci})"


def verdict(diffs: Mapping[tuple[str, str], Interval], claims: Sequence[tuple[str, str]],
            labels: Mapping[str, str] | None = None) -> dict:
    """Judge each claim (better, worse) by the paired interval ``diffs[(better, worse)]``.

    The ordering holds beyond seed noise only if every claim's interval lies above 0; it
    cannot be judged while a claim has fewer than 2 paired seeds and none fails.
    Returns ``{"claims": [{"better", "worse", "outcome", "text"}], "holds": bool, "line": str}``.
    """
    labels = labels or {}
    out = []
    for better, worse in claims:
        outcome, text = _claim(diffs.get((better, worse)), labels.get(better, better), labels.get(worse, worse))
        out.append({"better": better, "worse": worse, "outcome": outcome, "text": text})
    outcomes = {c["outcome"] for c in out}
    holds = bool(out) and outcomes == {"holds"}
    if holds:
        head = "holds beyond seed noise"
    elif outcomes & {"reversed", "within-noise"} or not out:
        head = "does NOT hold beyond seed noise"
    else:  # every claim that could be judged holds; the others lack paired seeds
        head = "cannot be judged yet (a claim has fewer than 2 paired seeds)"
    return {"claims": out, "holds": holds, "line": f"Verdict: the ordering {head}: " + "; ".join(c["text"] for c in out)}
