"""Training-curve figures: ``curves.png`` for one run, ``comparison.png`` across algorithms.

The panels are the metrics the paper reports (docs/math.md §7: reward, entropy, response
length, clip fractions, KL to the anchor) plus held-out accuracy (answer and strict format), the
largest importance weight (how far off-policy a step went) and the KL term's share of the update
(whether beta does anything at all, docs/algorithms.md). The metric names are
module constants so the trainer logs under exactly the names plotted here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rpgrl.loop import metrics as M  # noqa: E402
from rpgrl.loop.tracking import is_finite_number, read_metrics  # noqa: E402

__all__ = [
    "CLIPFRAC_KEYS",
    "CURVE_PANELS",
    "ENTROPY_KEY",
    "EVAL_ACCURACY_KEY",
    "KL_ANCHOR_KEY",
    "KL_SHARE_KEY",
    "LOG_PANEL_KEYS",
    "MAX_WEIGHT_KEY",
    "Panel",
    "RESPONSE_LENGTH_KEY",
    "REWARD_KEY",
    "spans_decades",
    "STEP_KEY",
    "STRICT_ACCURACY_KEY",
    "metric_series",
    "plot_comparison",
    "plot_curves",
]

STEP_KEY = M.STEP
REWARD_KEY = M.REWARD
EVAL_ACCURACY_KEY = M.EVAL_ACCURACY
ENTROPY_KEY = M.ENTROPY
RESPONSE_LENGTH_KEY = M.LENGTH_MEAN
KL_ANCHOR_KEY = M.KL_ANCHOR
CLIPFRAC_KEYS = M.CLIPFRACS
KL_SHARE_KEY = M.KL_SHARE
MAX_WEIGHT_KEY = M.actor("importance_weight_max")
STRICT_ACCURACY_KEY = M.EVAL_STRICT_ACCURACY


@dataclass(frozen=True)
class Panel:
    """One subplot: ``keys`` are drawn as separate lines in ``plot_curves``; in
    ``plot_comparison`` a multi-key panel shows their sum (the clip events are disjoint,
    so upper + lower + dual = total clipped fraction)."""

    title: str
    keys: tuple[str, ...]


CURVE_PANELS: tuple[Panel, ...] = (
    Panel("Reward (mean)", (REWARD_KEY,)),
    Panel("Held-out accuracy", (EVAL_ACCURACY_KEY,)),
    Panel("Entropy", (ENTROPY_KEY,)),
    Panel("Response length (tokens)", (RESPONSE_LENGTH_KEY,)),
    Panel("KL to anchor (k3)", (KL_ANCHOR_KEY,)),
    Panel("Clip fraction", CLIPFRAC_KEYS),
    Panel("Max importance weight", (MAX_WEIGHT_KEY,)),
    Panel("KL share of the update", (KL_SHARE_KEY,)),
    Panel("Held-out strict-format accuracy", (STRICT_ACCURACY_KEY,)),
)
#: panels whose values may span decades (one spike would flatten every other curve to 0)
LOG_PANEL_KEYS = ((KL_ANCHOR_KEY,), (MAX_WEIGHT_KEY,), (KL_SHARE_KEY,))

Records = Sequence[dict]


def _as_records(metrics: Records | str | os.PathLike) -> list[dict]:
    if isinstance(metrics, (str, os.PathLike)):
        return read_metrics(metrics)
    return list(metrics)


def metric_series(records: Records, keys: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) sorted by step; the last finite value per step wins.

    With several ``keys`` the values present at a step are summed (a step counts if any
    key is present there).
    """
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    per_step: dict[int, dict[str, float]] = {}
    for rec in records:
        if STEP_KEY not in rec:
            continue
        for k in keys:
            if is_finite_number(rec.get(k)):
                per_step.setdefault(int(rec[STEP_KEY]), {})[k] = float(rec[k])
    steps = np.array(sorted(per_step), dtype=np.int64)
    values = np.array([sum(per_step[s].values()) for s in steps], dtype=np.float64)
    return steps, values


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")


def _style(n_points: int) -> dict:
    return {"marker": "o", "markersize": 3} if n_points <= 30 else {}


def _grid(title: str | None):
    fig, axes = plt.subplots(3, 3, figsize=(15, 12.5), squeeze=False)
    if title:
        fig.suptitle(title)
    return fig, axes.ravel()


def _save(fig, out_png: str | os.PathLike) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_curves(metrics: Records | str | os.PathLike, out_png: str | os.PathLike, *, title: str | None = None) -> Path:
    """3x3 grid of one run's curves vs step (``metrics``: records, a metrics.jsonl or a run dir).

    Missing metrics leave a panel reading "no data" instead of failing.
    """
    records = _as_records(metrics)
    fig, axes = _grid(title)
    for ax, panel in zip(axes, CURVE_PANELS):
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        drawn = 0
        for key in panel.keys:
            steps, values = metric_series(records, key)
            if len(steps):
                ax.plot(steps, values, label=key.split("/")[-1] if len(panel.keys) > 1 else None, **_style(len(steps)))
                drawn += 1
        if drawn == 0:
            _no_data(ax)
        elif len(panel.keys) > 1:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, out_png)


def _aggregate(seed_series: list[tuple[np.ndarray, np.ndarray]], band: str):
    """Mean and band over seeds at each step where at least one seed has a value."""
    steps = np.unique(np.concatenate([s for s, _ in seed_series]))
    mean, lo, hi = (np.full(len(steps), np.nan) for _ in range(3))
    for i, step in enumerate(steps):
        vals = np.array([v[s == step][0] for s, v in seed_series if (s == step).any()])
        mean[i] = vals.mean()
        if band == "std":
            lo[i], hi[i] = mean[i] - vals.std(), mean[i] + vals.std()
        else:
            lo[i], hi[i] = vals.min(), vals.max()
    return steps, mean, lo, hi


def plot_comparison(
    runs: dict[str, Sequence[Records | str | os.PathLike]],
    out_png: str | os.PathLike,
    *,
    band: str = "minmax",
    title: str | None = None,
) -> Path:
    """Same panels, one line per algorithm (mean over seeds) with a band over seeds.

    ``runs`` maps an algorithm name to its seeds' metrics (records, metrics.jsonl paths
    or run dirs). ``band`` is ``"minmax"`` (honest with 2-3 seeds) or ``"std"`` (±1 std).
    """
    if band not in ("minmax", "std"):
        raise ValueError(f"band must be 'minmax' or 'std', got {band!r}")
    if not runs:
        raise ValueError("plot_comparison: runs is empty")
    loaded = {name: [_as_records(m) for m in seeds] for name, seeds in runs.items()}
    fig, axes = _grid(title)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes, CURVE_PANELS):
        ax.set_title(panel.title + (" (total)" if len(panel.keys) > 1 else ""))
        ax.set_xlabel("step")
        drawn, drawn_values = 0, []
        for j, (name, seeds) in enumerate(loaded.items()):
            series = [metric_series(recs, panel.keys) for recs in seeds]
            series = [sv for sv in series if len(sv[0])]
            if not series:
                continue
            drawn_values += [v for _, vals in series for v in vals]
            steps, mean, lo, hi = _aggregate(series, band)
            color = colors[j % len(colors)]
            ax.plot(steps, mean, color=color, label=f"{name} (n={len(series)})", **_style(len(steps)))
            if len(series) > 1:
                ax.fill_between(steps, lo, hi, color=color, alpha=0.2, linewidth=0)
            drawn += 1
        if drawn == 0:
            _no_data(ax)
        else:
            ax.legend(fontsize=8)
            if panel.keys in LOG_PANEL_KEYS and spans_decades(drawn_values):
                ax.set_yscale("log")
        ax.grid(alpha=0.3)
    return _save(fig, out_png)


def spans_decades(values: Sequence[float], decades: float = 2.0) -> bool:
    """Whether the positive finite ``values`` span more than ``decades`` powers of ten (and none
    is <= 0, which a log axis cannot show)."""
    vals = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    return bool(len(vals)) and bool((vals > 0).all()) and float(np.log10(vals.max() / vals.min())) > decades
