"""Seed statistics of ``rpgrl compare``: t-intervals, paired differences, the verdict.

With 3-5 seeds a mean ± std hides how little is known; a 95 % Student-t interval says it
(with 3 seeds the half-width is 2.48 standard deviations). Methods are compared *paired
by seed*: seed k of every method starts from the same policy with the same prompt stream
and random streams, so the per-seed difference removes what the seeds share and its interval is the
honest "beyond seed noise" test. Pure functions on plain numbers (no scipy).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

__all__ = ["Interval", "paired_difference", "student_t_cdf", "student_t_quantile", "t_interval", "verdict"]


# --------------------------------------------------------------------------- Student t


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b), x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"student_t_cdf: df must be > 0, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (bisection on the CDF; |error| < 1e-10)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"student_t_quantile: p must be in (0, 1), got {p}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10:
            break
    return 0.5 * (lo + hi)


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
    half = student_t_quantile(0.5 + level / 2.0, n - 1) * std / math.sqrt(n)
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
