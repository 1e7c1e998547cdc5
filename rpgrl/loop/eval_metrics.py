"""Evaluation metrics: Mean@k, unbiased pass@k, per-source tables, last/best tracking
(docs/math.md §7-8: the paper reports Mean@32 on AIME24/AIME25/AMC23, "last / best").

Pure functions over per-sample records ``{"data_source", "uid", "acc" or "score"}``;
generating the samples is the rollout's job.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any
from collections.abc import Iterable

__all__ = ["pass_at_k", "pass_ks", "summarize", "flatten", "format_table", "BestLastTracker"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) from n samples of which c are correct.

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) (Chen et al. 2021), which avoids the huge
    binomials of the direct form.
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_ks(k: int) -> list[int]:
    """The pass@ values reported for k samples: 1, 2, 4, ... up to k, and k itself."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ks = [2**j for j in range(int(math.log2(k)) + 1) if 2**j <= k]
    return ks if ks[-1] == k else ks + [k]


def _correct(rec: dict) -> bool:
    if "acc" in rec and rec["acc"] is not None:
        return bool(rec["acc"])
    if "score" in rec:
        return float(rec["score"]) > 0.0
    raise ValueError(f"evaluation record needs 'acc' or 'score': {rec!r}")


def _metrics(problems: dict[str, list[bool]], k: int) -> dict[str, float]:
    n_samples = sum(len(v) for v in problems.values())
    out: dict[str, float] = {
        f"mean@{k}": sum(sum(v) for v in problems.values()) / n_samples,
    }
    for j in pass_ks(k):
        out[f"pass@{j}"] = sum(pass_at_k(len(v), sum(v), j) for v in problems.values()) / len(problems)
    out["n_problems"] = len(problems)
    out["n_samples"] = n_samples
    return out


def summarize(records: Iterable[dict], k: int) -> dict[str, Any]:
    """Per-data_source and overall metrics from one record per sampled response.

    ``mean@k`` is accuracy averaged over samples; ``pass@j`` (j = 1, 2, 4, ..., k) is the
    unbiased estimator averaged over problems (``uid``). Every problem needs >= k samples.
    Returns ``{"by_source": {ds: metrics}, "overall": metrics}``.
    """
    by_source: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        by_source[rec["data_source"]][rec["uid"]].append(_correct(rec))
    if not by_source:
        raise ValueError("summarize: no records")
    for ds, problems in by_source.items():
        for uid, v in problems.items():
            if len(v) < k:
                raise ValueError(f"summarize: problem {uid!r} of {ds!r} has {len(v)} samples, fewer than k={k}")
    overall = {f"{ds}\x00{uid}": v for ds, probs in by_source.items() for uid, v in probs.items()}
    return {
        "by_source": {ds: _metrics(probs, k) for ds, probs in sorted(by_source.items())},
        "overall": _metrics(overall, k),
    }


def flatten(summary: dict[str, Any]) -> dict[str, float]:
    """``{"aime2025/mean@32": ..., "overall/pass@1": ...}`` for loggers and the tracker."""
    flat = {f"overall/{m}": v for m, v in summary["overall"].items()}
    for ds, metrics in summary["by_source"].items():
        flat.update({f"{ds}/{m}": v for m, v in metrics.items()})
    return flat


def format_table(summary: dict[str, Any]) -> str:
    """Markdown table: one row per data source plus overall."""
    cols = [c for c in summary["overall"] if c not in ("n_problems", "n_samples")]
    lines = ["| source | problems | " + " | ".join(cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    rows = list(summary["by_source"].items()) + [("overall", summary["overall"])]
    for name, m in rows:
        lines.append(f"| {name} | {m['n_problems']} | " + " | ".join(f"{m[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)


class BestLastTracker:
    """Keeps the last value and the best value (with its step) of every metric across the
    evaluations of a run — the paper's "last / best" columns (docs/math.md §8).

    Higher is better unless the metric name is in ``lower_is_better``; counts
    (``n_problems``, ``n_samples``) only track "last".
    """

    _COUNTS = ("n_problems", "n_samples")

    def __init__(self, lower_is_better: Iterable[str] = ()) -> None:
        self.lower_is_better = set(lower_is_better)
        self.last: dict[str, float] = {}
        self.last_step: int | None = None
        self.best: dict[str, dict[str, float]] = {}

    def update(self, step: int, metrics: dict[str, float]) -> None:
        """Record one evaluation (flat metric dict, e.g. from ``flatten``)."""
        self.last_step = step
        for name, value in metrics.items():
            value = float(value)
            self.last[name] = value
            if name.rsplit("/", 1)[-1] in self._COUNTS or not math.isfinite(value):
                continue
            prev = self.best.get(name)
            lower = name in self.lower_is_better
            if prev is None or (value < prev["value"] if lower else value > prev["value"]):
                self.best[name] = {"value": value, "step": step}

    def to_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "last": dict(self.last), "best": dict(self.best),
                "lower_is_better": sorted(self.lower_is_better)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BestLastTracker:
        t = cls(d.get("lower_is_better", ()))
        t.last_step = d.get("last_step")
        t.last = {k: float(v) for k, v in d.get("last", {}).items()}
        t.best = {k: {"value": float(v["value"]), "step": int(v["step"])} for k, v in d.get("best", {}).items()}
        return t

    def save(self, path: str | Path) -> None:
        """Atomic JSON write (tmp file + rename), so a crash never leaves half a file."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> BestLastTracker:
        return cls.from_dict(json.loads(Path(path).read_text()))
