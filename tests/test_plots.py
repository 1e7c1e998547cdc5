"""Figures: valid PNGs, missing metrics tolerated, series extraction by hand."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

import rpgrl.tools.plots as plots
from rpgrl.tools.plots import CLIPFRAC_KEYS, CURVE_PANELS, metric_series, plot_comparison, plot_curves
from rpgrl.loop.tracking import Tracker

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_run(seed: int, steps: int = 40, offset: float = 0.0) -> list[dict]:
    rng = np.random.default_rng(seed)
    recs = []
    for s in range(1, steps + 1):
        rec = {
            "step": s,
            "reward/mean": offset + 0.5 * (1 - math.exp(-s / 10)) + 0.02 * rng.standard_normal(),
            "actor/entropy": 1.5 * math.exp(-s / 30),
            "response_length/mean": 200 + 3 * s,
            "actor/kl_anchor_k3": 1e-3 * s,
            "actor/clipfrac_upper": 0.02,
            "actor/clipfrac_lower": 0.01,
            "actor/clipfrac_dual": 0.001,
        }
        recs.append(rec)
        if s % 10 == 0:
            recs.append({"step": s, "eval/accuracy": offset + 0.02 * s})
    return recs


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 500 and img.shape[1] > 1000


def test_panels_cover_the_paper_metrics():
    keys = [k for p in CURVE_PANELS for k in p.keys]
    assert len(CURVE_PANELS) == 9 and len(keys) == len(set(keys))
    assert {"reward/mean", "eval/accuracy", "actor/entropy", "response_length/mean", "actor/kl_anchor_k3",
            "actor/importance_weight_max", "actor/kl_share", "eval/strict_acc"} <= set(keys)
    assert set(CLIPFRAC_KEYS) <= set(keys)


def test_study2_figures_take_each_family_from_the_json(tmp_path):
    """benchmarks/study2_figures.py: each hypothesis family's arms, in order, on its declared seeds
    (H5 pairs DAPO's seeds 0-4 only, though the arm has 8), each run's curve rebuilt from the JSON."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("study2_figures", Path(__file__).parents[1] / "benchmarks" / "study2_figures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    runs = [{"algorithm": arm, "seed": s, "eval_curve": [[0, 0.25], [2, 0.5 + s / 100]],
             "curves": {"actor/kl_share": [[1, 0.1 * (s + 1)]]}} for arm in ("grpo_paper", "dapo") for s in range(8)]
    drawn = mod.family_runs(runs, mod.FAMILIES["study2_h5"][1], mod.FAMILIES["study2_h5"][2])
    assert list(drawn) == ["dapo", "grpo_paper"] and [len(v) for v in drawn.values()] == [5, 5]
    assert drawn["dapo"][4] == [{"step": 0, "eval/accuracy": 0.25}, {"step": 1, "actor/kl_share": 0.5},
                                {"step": 2, "eval/accuracy": 0.54}]
    (tmp_path / "s.json").write_text(json.dumps({"runs": runs}))
    mod.main([str(tmp_path / "s.json"), "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["study2_h1_h2.png", "study2_h5.png"]


def test_metric_series_by_hand():
    recs = [
        {"step": 2, "a": 1.0},
        {"step": 1, "a": 5.0, "b": 1.0},
        {"step": 2, "a": 3.0},  # last value for a step wins
        {"step": 3, "a": float("nan"), "b": 2.0},  # nan skipped
        {"step": 4, "c": 9.0},
        {"a": 7.0},  # no step: ignored
    ]
    steps, vals = metric_series(recs, "a")
    assert steps.tolist() == [1, 2] and vals.tolist() == [5.0, 3.0]
    steps, vals = metric_series(recs, ("a", "b"))  # summed where present
    assert steps.tolist() == [1, 2, 3] and vals.tolist() == [6.0, 3.0, 2.0]
    steps, vals = metric_series(recs, "zzz")
    assert len(steps) == 0 and len(vals) == 0


def test_plot_curves_from_records_and_from_tracker_dir(tmp_path):
    out = plot_curves(synthetic_run(0), tmp_path / "figs" / "curves.png", title="demo")
    assert_png(out)
    with Tracker(tmp_path / "run", tensorboard=False) as tr:
        for rec in synthetic_run(1, steps=5):
            tr.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])
    assert_png(plot_curves(tmp_path / "run", tmp_path / "c2.png"))


def test_missing_keys_give_no_data_panels(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(plots, "_no_data", lambda ax: calls.append(ax.get_title()))
    out = plot_curves([{"step": s, "reward/mean": 0.1 * s} for s in range(5)], tmp_path / "c.png")
    assert_png(out)
    assert sorted(calls) == sorted(p.title for p in CURVE_PANELS[1:])
    calls.clear()
    assert_png(plot_curves([], tmp_path / "empty.png"))
    assert len(calls) == len(CURVE_PANELS) == 9


def test_plot_comparison(tmp_path, monkeypatch):
    runs = {
        "grpo": [synthetic_run(0), synthetic_run(1)],
        "rpg_ufkl": [synthetic_run(2, offset=0.1), synthetic_run(3, offset=0.1)],
        "only_reward": [[{"step": 1, "reward/mean": 0.3}]],
    }
    assert_png(plot_comparison(runs, tmp_path / "comparison.png", title="cmp"))
    assert_png(plot_comparison(runs, tmp_path / "comparison_std.png", band="std"))
    with pytest.raises(ValueError, match="band"):
        plot_comparison(runs, tmp_path / "x.png", band="iqr")
    with pytest.raises(ValueError, match="empty"):
        plot_comparison({}, tmp_path / "x.png")


def test_aggregate_mean_and_bands():
    a = (np.array([1, 2]), np.array([1.0, 3.0]))
    b = (np.array([2, 3]), np.array([5.0, 7.0]))
    steps, mean, lo, hi = plots._aggregate([a, b], "minmax")
    assert steps.tolist() == [1, 2, 3]
    assert mean.tolist() == [1.0, 4.0, 7.0] and lo.tolist() == [1.0, 3.0, 7.0] and hi.tolist() == [1.0, 5.0, 7.0]
    _, mean, lo, hi = plots._aggregate([a, b], "std")
    assert lo.tolist() == [1.0, 3.0, 7.0] and hi.tolist() == [1.0, 5.0, 7.0]  # std of {3,5} is 1


def test_kl_panel_goes_log_only_when_the_values_span_decades():
    from rpgrl.tools.plots import spans_decades

    assert spans_decades([2e-3, 0.5, 700.0])  # one run's KL spike: a linear axis shows the others as 0
    assert not spans_decades([0.05, 0.9, 3.6])
    assert not spans_decades([0.0, 1e-3, 700.0])  # a zero cannot be drawn on a log axis
    assert not spans_decades([float("nan"), 1.0]) and not spans_decades([])
