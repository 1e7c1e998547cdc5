"""``rpgrl compare`` / ``rpgrl plot``: the table's numbers (hand-made runs) and the CLI end to end."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from rpgrl.tools.compare import algorithm_of, format_table, main as compare_main, plot_runs, run_result
from rpgrl.loop.tracking import read_metrics


def _cli(argv: list[str]) -> int:
    """Through ``rpgrl.cli`` once the lead wires add_subcommands in, else this module's parser."""
    from rpgrl import cli

    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    if "compare" in sub.choices:
        return cli.main(argv)
    return compare_main(argv)


def _fake_run(d: Path, algo: str, evals: dict[int, float], wall: float = 10.0, config_only: bool = False) -> Path:
    d.mkdir(parents=True)
    lines = [{"step": s, "eval/accuracy": v} for s, v in evals.items()]
    lines.insert(1, {"step": 1, "reward/mean": 0.1})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if config_only:
        (d / "config.yaml").write_text(f"seed: 0\nalgorithm:\n  name: {algo}\n")
        return d
    last = evals[max(evals)]
    (d / "summary.json").write_text(json.dumps({
        "eval_before": {"accuracy": evals.get(0, float("nan"))}, "eval_after": {"accuracy": last},
        "wall_seconds": wall, "steps": max(evals), "algorithm": algo}))
    return d


def test_best_excludes_before_rl_and_table_is_mean_pm_sample_std(tmp_path):
    a = _fake_run(tmp_path / "a", "grpo", {0: 0.9, 10: 0.5, 20: 0.7, 30: 0.6}, wall=100.0)
    b = _fake_run(tmp_path / "b", "grpo", {0: 0.9, 10: 0.4, 20: 0.3, 30: 0.2}, wall=120.0)
    ra, rb = run_result(a), run_result(b)
    assert (ra["before"], ra["last"], ra["best"], ra["steps"]) == (0.9, 0.6, 0.7, 30)
    assert (rb["last"], rb["best"]) == (0.2, 0.4)  # 0.9 at step 0 is "before", not "best"
    table = format_table({"grpo": [ra, rb], "dapo": [ra]})
    rows = table.splitlines()
    # last: mean 40.0, sample std sqrt(((60-40)^2 + (20-40)^2) / 1) = 28.28...; best 55.0 ± 21.2
    assert rows[2] == "| grpo | 2 | 30 | 90.0 ± 0.0 | 40.0 ± 28.3 | 55.0 ± 21.2 | 110 ± 14 |"
    assert rows[3] == "| dapo | 1 | 30 | 90.0 | 60.0 | 70.0 | 100 |"  # one seed: no ± column


def test_algorithm_of_falls_back_to_config_yaml(tmp_path):
    d = _fake_run(tmp_path / "x", "rpg_fkl", {0: 0.1, 5: 0.2}, config_only=True)
    assert algorithm_of(d) == "rpg_fkl"  # a config written before algorithm.name became preset
    (d / "config.yaml").write_text("seed: 0\nalgorithm:\n  preset: grpo\n")  # what the trainer writes now
    assert algorithm_of(d) == "grpo"
    with pytest.raises(FileNotFoundError, match="summary.json"):
        run_result(d)  # an unfinished run has no table row
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_runs([tmp_path / "nothing"], tmp_path / "p.png")


@pytest.mark.medium
def test_compare_and_plot_end_to_end(tiny_overrides, tmp_path, capsys):
    out = tmp_path / "cmp"
    algos = ["grpo", "rpg_reinforce_ufkl"]
    # overrides after --algorithms must not be taken for algorithm names
    argv = ["compare", "--seeds", "1", "--out", str(out), "--algorithms", *algos,
            *tiny_overrides("trainer.eval_every=1")]
    assert _cli(argv) == 0
    md = (out / "comparison.md").read_text()
    png = out / "comparison.png"
    assert png.stat().st_size > 10_000
    for algo in algos:
        run = out / algo / "seed0"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["algorithm"] == algo and summary["steps"] == 2
        evals = [r["eval/accuracy"] for r in read_metrics(run) if "eval/accuracy" in r]
        assert len(evals) == 3  # before RL, after step 1, after step 2
        row = next(line for line in md.splitlines() if line.startswith(f"| {algo} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:3] == ["1", "2"]
        assert all(re.fullmatch(r"\d+(\.\d+)?", c) for c in cells[3:]), row
        assert float(cells[3]) == pytest.approx(100 * evals[0], abs=0.05)
        assert float(cells[4]) == pytest.approx(100 * summary["eval_after"]["accuracy"], abs=0.05)
        assert float(cells[5]) == pytest.approx(100 * max(evals[1:]), abs=0.05)
    saved = json.loads((out / "comparison.json").read_text())
    assert list(saved) == algos

    # a second compare into the same --out is refused (it would append to metrics.jsonl) ...
    assert _cli(argv) == 2
    assert "--resume" in capsys.readouterr().err
    # ... and --resume reuses the finished runs without training again
    before = (out / "grpo" / "seed0" / "metrics.jsonl").read_text()
    assert _cli([*argv, "--resume"]) == 0
    assert (out / "grpo" / "seed0" / "metrics.jsonl").read_text() == before

    plot_png = tmp_path / "plot.png"
    assert _cli(["plot", str(out / "grpo" / "seed0"), str(out / "rpg_reinforce_ufkl" / "seed0"),
                 "--out", str(plot_png)]) == 0
    assert plot_png.stat().st_size > 10_000
    assert "grpo (1 run)" in capsys.readouterr().out


def test_bad_algorithm_fails_before_any_training(tiny_overrides, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert _cli(["compare", "--algorithms", "grpo", "nope", "--seeds", "1", "--out", str(out),
                 *tiny_overrides()]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (out / "grpo").exists()


# --------------------------------------------------------------------------- seed statistics


def test_t_intervals_match_the_printed_table():
    """scipy.stats' t quantiles behind t_interval, cross-checked with the two-sided 95 % critical
    values of any statistics textbook's t table (the hand-written CDF they replaced gave the same)."""
    import math

    from rpgrl.tools.stats import t_interval

    for df, t in [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (29, 2.0452)]:
        vals = [float(i % 3) for i in range(df + 1)]
        iv = t_interval(vals)
        assert iv.half_width == pytest.approx(t * iv.std / math.sqrt(df + 1), rel=2e-5)


def test_t_interval_and_paired_difference_by_hand():
    from rpgrl.tools.stats import paired_difference, t_interval

    iv = t_interval([0.5, 0.6, 0.7])
    # mean 0.6, s = 0.1, half-width t(0.975, 2) * 0.1 / sqrt(3) = 4.302653 * 0.057735 = 0.248414
    assert (iv.mean, iv.n) == (pytest.approx(0.6), 3) and iv.std == pytest.approx(0.1)
    assert (iv.lo, iv.hi) == (pytest.approx(0.351586, abs=1e-6), pytest.approx(0.848414, abs=1e-6))
    one = t_interval([0.4, float("nan")])  # one finite value: a mean, no interval
    assert one.mean == 0.4 and one.n == 1 and math.isnan(one.lo) and not one.excludes_zero()
    # pairs by seed: seed 3 exists only in b and is left out; diffs 0.10, 0.15, 0.05
    d = paired_difference({0: 0.6, 1: 0.7, 2: 0.65}, {0: 0.5, 1: 0.55, 2: 0.6, 3: 0.9})
    assert d.n == 3 and d.mean == pytest.approx(0.1) and d.std == pytest.approx(0.05)
    assert (d.lo, d.hi) == (pytest.approx(-0.024207, abs=1e-6), pytest.approx(0.224207, abs=1e-6))
    assert not d.excludes_zero()  # +10 points, but 3 seeds cannot tell it from noise


def test_verdict_outcomes():
    from rpgrl.tools.stats import Interval, verdict

    diffs = {("a", "b"): Interval(0.11, 0.085, 0.135, 3, 0.01), ("b", "c"): Interval(-0.1, -0.17, -0.03, 3, 0.03),
             ("a", "c"): Interval(0.03, -0.19, 0.26, 3, 0.09), ("d", "c"): Interval(0.2, math.nan, math.nan, 1, math.nan)}
    v = verdict(diffs, [("a", "b"), ("b", "c"), ("a", "c"), ("d", "c"), ("e", "c")], {"a": "A"})
    assert [c["outcome"] for c in v["claims"]] == ["holds", "reversed", "within-noise", "too-few-seeds", "missing"]
    assert v["claims"][0]["text"] == "A > b beyond seed noise (+11.0 pts, 95% CI [+8.5, +13.5], 3 seeds)"
    assert not v["holds"] and "does NOT hold" in v["line"]
    assert verdict(diffs, [("a", "b")])["holds"]
    one_seed = verdict(diffs, [("a", "b"), ("d", "c")])
    assert not one_seed["holds"] and "cannot be judged yet" in one_seed["line"]


def test_parse_seeds_and_algorithms():
    from rpgrl.tools.compare import parse_algorithms, parse_seeds
    from rpgrl.config import ConfigError

    assert parse_seeds("3") == [0, 1, 2] and parse_seeds(2) == [0, 1]
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("4,") == [4] and parse_seeds("2-4") == [2, 3, 4]
    for bad in ("0", "a", "1,1", "-1,"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)
    assert parse_algorithms(["grpo,dapo", "rpg_ufkl"]) == ["grpo", "dapo", "rpg_ufkl"]


# last held-out accuracy per (method, seed); the middle evaluation is last - 0.05, except
# grpo seed 1, which peaks at 0.50 and falls to 0.42 (a drop of 8 points)
STUDY_LAST = {"grpo": (0.40, 0.42, 0.38), "dapo": (0.50, 0.55, 0.45),
              "rpg_reinforce_ufkl": (0.60, 0.66, 0.57), "rpg_reinforce_urkl": (0.52, 0.50, 0.58)}


def _study_run(out: Path, algo: str, seed: int, last: float, *, kl: float, iw: float, digest: int | None = None) -> Path:
    d = out / algo / f"seed{seed}"
    d.mkdir(parents=True)
    mid = 0.50 if (algo, seed) == ("grpo", 1) else last - 0.05
    evals = {0: 0.30, 2: mid, 4: last}
    rows = []
    for step in range(1, 5):
        rows.append({"step": step, "batch/first_round_digest": (1000 + seed if digest is None else digest) * step,
                     "actor/kl_anchor_k3": kl * step / 4, "actor/importance_weight_max": iw - 4 + step,
                     "actor/clipfrac_upper": 0.01 * step, "actor/clipfrac_lower": 0.005, "actor/clipfrac_dual": 0.0,
                     "actor/optimizer_steps": 8 if step != 3 else 6, "actor/skipped_steps_total": 0,
                     "memory/peak_rss_mb": 9999.0, "timing/step": 10.0 * step})
        if step in evals:
            rows.append({"step": step, "eval/accuracy": evals[step], "eval/overall/n_problems": 256})
    rows.insert(0, {"step": 0, "eval/accuracy": evals[0], "eval/overall/n_problems": 256})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps({
        "eval_before": {"accuracy": 0.30, "strict_acc": 0.0}, "eval_after": {"accuracy": last, "strict_acc": 0.1},
        "wall_seconds": 600.0 + seed, "train_seconds": 550.0, "steps": 4, "algorithm": algo, "skipped_steps": 0,
        "eval_best_last": {"last": {"eval/overall/n_problems": 256}}}))
    (d / "compare_run.json").write_text(json.dumps({"algorithm": algo, "seed": seed, "peak_rss_mb": 5000.0 + seed,
                                                    "run_command": f"rpgrl train x.yaml algorithm.preset={algo}"}))
    return d


@pytest.fixture
def study_out(tmp_path) -> Path:
    out = tmp_path / "study"
    for algo, lasts in STUDY_LAST.items():
        for seed, last in enumerate(lasts):
            _study_run(out, algo, seed, last, kl=0.02 * (seed + 1), iw=5.0 + seed)
    (out / "dapo" / "seed9").mkdir()  # an unfinished run: not in the report
    (out / "dapo" / "seed9" / "metrics.jsonl").write_text('{"step": 0, "eval/accuracy": 0.1}\n')
    return out


def test_report_of_finished_runs_numbers_and_verdict(study_out, tmp_path):
    """``--report-only`` over real run folders: per-run fields, intervals, paired differences,
    stability, the verdict; the JSON has the documented shape."""
    js = tmp_path / "docs" / "real-study.json"
    rc = _cli(["compare", "--algorithms", "grpo,dapo", "--seeds", "0,1", "--out", str(study_out), "--report-only",
               "--json", str(js)])
    assert rc == 0
    study = json.loads(js.read_text())
    assert study == json.loads((study_out / "study.json").read_text())
    assert study["command"].startswith("rpgrl compare --algorithms grpo,dapo --seeds 0,1")
    assert study["task"]["n_heldout"] == 256 and study["task"]["disjoint"] is True
    runs = study["runs"]
    # every finished run under --out, not only the requested chunk; requested methods first
    assert [(r["algorithm"], r["seed"]) for r in runs][:4] == [("grpo", 0), ("grpo", 1), ("grpo", 2), ("dapo", 0)]
    assert len(runs) == 12
    g1 = next(r for r in runs if (r["algorithm"], r["seed"]) == ("grpo", 1))
    assert (g1["before"], g1["last"], g1["best"]) == (0.30, 0.42, 0.50)
    assert g1["max_accuracy_drop"] == pytest.approx(0.08)  # 0.50 -> 0.42
    assert g1["n_heldout"] == 256 and g1["skipped_steps"] == 0
    assert g1["kl_anchor_max"] == pytest.approx(0.04) and g1["importance_weight_max"] == pytest.approx(6.0)
    assert g1["clipfrac_max"] == pytest.approx(0.045) and g1["clipfrac_mean"] == pytest.approx(0.03)
    assert g1["optimizer_steps_per_batch"] == pytest.approx(7.5) and g1["optimizer_steps_per_batch_min"] == 6
    assert g1["peak_rss_mb"] == 5001.0 and g1["wall_s"] == 601.0  # compare_run.json's own-process peak
    assert g1["eval_curve"] == [[0, 0.30], [2, 0.50], [4, 0.42]]
    d0 = next(r for r in runs if (r["algorithm"], r["seed"]) == ("dapo", 0))
    assert d0["max_accuracy_drop"] == 0.0 and d0["best"] == 0.50

    m = study["methods"]
    assert m["grpo"]["last"]["mean"] == pytest.approx(0.40)
    # grpo last: 0.40, 0.42, 0.38: s = 0.02, half = 4.302653 * 0.02 / sqrt(3) = 0.049683
    assert m["grpo"]["last"]["lo"] == pytest.approx(0.40 - 0.049683, abs=1e-6)
    assert m["grpo"]["max_accuracy_drop"] == pytest.approx(0.08)
    assert m["rpg_reinforce_ufkl"]["importance_weight_max"] == pytest.approx(7.0)
    assert m["dapo"]["peak_rss_mb"] == 5002.0
    p = study["paired"]
    # ufkl - dapo: 0.10, 0.11, 0.12 -> mean 0.11, s 0.01, half 0.024841
    u = p["rpg_reinforce_ufkl"]["last_minus_dapo"]
    assert (u["mean"], u["lo"], u["hi"]) == (pytest.approx(0.11), pytest.approx(0.085159, abs=1e-6),
                                              pytest.approx(0.134841, abs=1e-6))
    # dapo - grpo: 0.10, 0.13, 0.07 -> mean 0.10, s 0.03, half 0.074524
    dg = p["dapo"]["last_minus_grpo"]
    assert (dg["lo"], dg["hi"]) == (pytest.approx(0.025476, abs=1e-6), pytest.approx(0.174524, abs=1e-6))
    # urkl - dapo: 0.02, -0.05, 0.13 -> mean 0.0333, s 0.090738, half 0.225404: straddles 0
    ur = p["rpg_reinforce_urkl"]["last_minus_dapo"]
    assert ur["std"] == pytest.approx(0.0907377, abs=1e-6) and ur["lo"] < 0 < ur["hi"]
    assert "last_minus_dapo" not in p["dapo"] and "last_minus_grpo" in p["dapo"]
    v = study["verdict"]
    assert [c["outcome"] for c in v["claims"]] == ["holds", "within-noise", "holds"]
    assert v["holds"] is False
    md = (study_out / "comparison.md").read_text()
    assert v["line"] in md
    assert "| RPG-REINFORCE-UFKL | +11.0 [+8.5, +13.5] |" in md
    assert "| GRPO | 0,1,2 | 30.0 [30.0, 30.0] | 40.0 [35.0, 45.0] |" in md
    assert (study_out / "comparison.png").stat().st_size > 10_000


def test_report_refuses_runs_made_with_another_setting(study_out, capsys):
    cfg = study_out / "dapo" / "seed1" / "config.yaml"
    from rpgrl.config import dump_yaml, load_config

    other = load_config(None, ["algorithm.preset=dapo", "seed=1", f"output_dir={cfg.parent}", "optim.lr=1e-3"])
    cfg.write_text(dump_yaml(other))
    assert _cli(["compare", "--algorithms", "dapo", "--seeds", "1,", "--out", str(study_out), "--report-only"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.001 there, 0.0002 here" in err and str(cfg.parent) in err
    # the same setting (here: the default) is accepted
    cfg.write_text(dump_yaml(load_config(None, ["algorithm.preset=dapo", "seed=1", f"output_dir={cfg.parent}"])))
    assert _cli(["compare", "--algorithms", "dapo", "--seeds", "1,", "--out", str(study_out), "--report-only"]) == 0


@pytest.mark.medium
def test_resume_continues_an_unfinished_run_and_restarts_one_without_checkpoint(tiny_overrides, tmp_path, capsys):
    """A chunk killed mid-run: --resume continues it from its checkpoint (no duplicated
    metric lines); a run killed before its first checkpoint starts again from scratch."""
    out = tmp_path / "cmp"
    argv = ["compare", "--seeds", "0,1", "--out", str(out), "--algorithms", "rpg_reinforce_ufkl",
            *tiny_overrides("trainer.total_steps=3", "trainer.save_every=2")]
    assert _cli(argv) == 0
    s0, s1 = out / "rpg_reinforce_ufkl" / "seed0", out / "rpg_reinforce_ufkl" / "seed1"
    full = [(r["step"], sorted(r)) for r in read_metrics(s0)]
    # seed 0 "killed" during step 3, after its step-2 checkpoint; seed 1 before any checkpoint
    import shutil

    (s0 / "summary.json").unlink()
    shutil.rmtree(s0 / "checkpoints" / "step_000003")
    (s1 / "summary.json").unlink()
    shutil.rmtree(s1 / "checkpoints")
    assert _cli([*argv, "--resume"]) == 0
    log = capsys.readouterr().out
    assert "resumed from" in log and "unfinished and without a checkpoint; starting it again" in log
    for run in (s0, s1):
        steps = [r["step"] for r in read_metrics(run) if "actor/loss" in r]
        assert steps == [1, 2, 3], run  # nothing twice
        assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert [(r["step"], sorted(r)) for r in read_metrics(s0)] == full  # same lines, same keys
    info = json.loads((s0 / "compare_run.json").read_text())
    assert len(info["attempts"]) == 2 and info["seed"] == 0


def test_config_and_overrides_may_come_between_and_after_the_options(study_out):
    """``CONFIG.yaml --algorithms a --seeds 0, key=value`` (positionals in two runs) parses:
    plain argparse rejected the trailing overrides as unrecognized arguments."""
    from rpgrl.cli import build_parser

    cfg = study_out / "x.yaml"
    cfg.write_text("trainer:\n  total_steps: 4\n")
    args = build_parser().parse_args(["compare", str(cfg), "--algorithms", "dapo", "--seeds", "0,",
                                      "trainer.eval_every=2", "--out", str(study_out), "optim.lr=1e-5"])
    assert (args.items, args.seeds, args.out) == ([str(cfg), "trainer.eval_every=2", "optim.lr=1e-5"], "0,",
                                                  str(study_out))
    assert _cli(["compare", str(cfg), "--algorithms", "dapo", "--seeds", "0,", "trainer.eval_every=2",
                 "--out", str(study_out), "--report-only"]) == 0
    study = json.loads((study_out / "study.json").read_text())
    assert study["config"] == str(cfg) and study["overrides"] == ["trainer.eval_every=2"]


def test_shared_before_fills_runs_that_skipped_their_own(study_out, tmp_path):
    """``--shared-before``: runs without a before-RL evaluation report the one measured run's,
    and their largest accuracy drop counts the fall from it."""
    for algo in ("dapo", "grpo"):
        d = study_out / algo / "seed2"
        s = json.loads((d / "summary.json").read_text())
        s["eval_before"] = {"accuracy": float("nan")}  # what the trainer writes when it skipped it
        (d / "summary.json").write_text(json.dumps(s))
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] > 0))
    rc = _cli(["compare", "--algorithms", "grpo,dapo", "--seeds", "0,1,2", "--out", str(study_out), "--report-only",
               "--json", str(tmp_path / "s.json")])
    assert rc == 0
    runs = {(r["algorithm"], r["seed"]): r for r in json.loads((tmp_path / "s.json").read_text())["runs"]}
    g2 = runs[("grpo", 2)]
    assert g2["before"] == 0.30 and g2["strict_before"] == 0.0
    assert g2["before_source"] == "shared: measured once by dapo/seed0"
    assert g2["eval_curve"][0] == [0, 0.30]
    assert runs[("grpo", 0)]["before_source"] == "own"


def test_shared_baseline_is_the_first_measured_run_and_drop_counts_it():
    from rpgrl.tools.compare_report import fill_shared_before, shared_baseline

    nan = float("nan")
    results = {"b": [{"seed": 0, "before": nan, "strict_before": nan, "eval_curve": [[2, 0.1], [4, 0.2]],
                      "max_accuracy_drop": 0.0}],
               "a": [{"seed": 1, "before": 0.5, "strict_before": 0.25, "eval_curve": [[0, 0.5]],
                      "max_accuracy_drop": nan}]}
    base = shared_baseline(results)
    assert base == {"run": "a/seed1", "before": 0.5, "strict_before": 0.25}
    fill_shared_before(results, base)
    b = results["b"][0]
    assert b["eval_curve"] == [[0, 0.5], [2, 0.1], [4, 0.2]] and b["max_accuracy_drop"] == pytest.approx(0.4)
    assert shared_baseline({"x": [{"seed": 0, "before": nan}]}) is None


def test_figure_starts_every_curve_at_the_shared_before(tmp_path, monkeypatch):
    """A run that took the shared before-RL evaluation has no step 0 in its metrics.jsonl; the
    figure still starts its held-out accuracy at step 0 (the shared value), like its eval_curve."""
    from rpgrl.tools import compare, plots
    from rpgrl.tools.compare_report import fill_shared_before, shared_baseline

    results = {"a": [run_result(_fake_run(tmp_path / "a" / "seed0", "a", {0: 0.3, 2: 0.5}))],
               "b": [run_result(_fake_run(tmp_path / "b" / "seed0", "b", {2: 0.4, 4: 0.6}))]}
    fill_shared_before(results, shared_baseline(results))
    drawn = {}
    monkeypatch.setattr(plots, "plot_comparison", lambda runs, out, band: drawn.update(runs) or out)
    compare._plot(results, tmp_path / "c.png", "minmax")
    for algo, first in (("a", 0.3), ("b", 0.3)):
        steps, values = plots.metric_series(plots._as_records(drawn[algo][0]), "eval/accuracy")
        assert steps[0] == 0 and values[0] == pytest.approx(first), algo
    assert list(plots.metric_series(plots._as_records(drawn["b"][0]), "eval/accuracy")[0]) == [0, 2, 4]


def test_earlier_json_reports_runs_whose_folders_are_gone(study_out, tmp_path, capsys):
    """``--earlier-json``: a study rebuilt after run folders were lost (another machine, a
    wiped disk) reports the recorded runs with the same numbers, its own folders winning."""
    import shutil

    first = tmp_path / "first.json"
    argv = ["compare", "--algorithms", "grpo,dapo,rpg_reinforce_ufkl,rpg_reinforce_urkl", "--seeds", "0,1,2",
            "--out", str(study_out), "--report-only"]
    assert _cli([*argv, "--json", str(first)]) == 0
    before = json.loads(first.read_text())
    assert before["runs"][0]["curves"]["actor/kl_anchor_k3"] == [[1, 0.005], [2, 0.01], [3, 0.015], [4, 0.02]]
    shutil.rmtree(study_out / "grpo")
    shutil.rmtree(study_out / "dapo" / "seed2")
    (study_out / "comparison.png").unlink()
    # dapo seed 0 "was recorded" 20 points higher than its folder here now says (a rerun elsewhere)
    edited = json.loads(first.read_text())
    next(r for r in edited["runs"] if (r["algorithm"], r["seed"]) == ("dapo", 0))["last"] += 0.20
    next(r for r in edited["runs"] if (r["algorithm"], r["seed"]) == ("dapo", 1))["wall_s"] += 1.0  # another run
    next(r for r in edited["runs"] if (r["algorithm"], r["seed"]) == ("grpo", 2))["curves"] = None  # older JSON
    first.write_text(json.dumps(edited))
    second = tmp_path / "second.json"
    assert _cli([*argv, "--earlier-json", str(first), "--json", str(second)]) == 0
    assert "4 run(s) reported from their record in" in capsys.readouterr().out
    after = json.loads(second.read_text())
    key = lambda r: (r["algorithm"], r["seed"])  # noqa: E731
    assert sorted(map(key, after["runs"])) == sorted(map(key, before["runs"]))
    recorded = {key(r) for r in after["runs"] if r["recorded_in"] == str(first)}
    assert recorded == {("grpo", 0), ("grpo", 1), ("grpo", 2), ("dapo", 2)}
    for name in ("methods", "paired", "verdict"):
        assert after[name] == before[name], name
    # the folders that replaced records are reruns: reproduced within max(5 pts, 2 x seed std)
    rr = {(r["algorithm"], r["seed"]): r for r in after["reruns"]["runs"]}
    assert set(rr) == {("dapo", 0), ("dapo", 1)}  # the others are the folders' own runs, recorded
    d0 = rr[("dapo", 0)]
    assert d0["difference"] == pytest.approx(-0.20) and d0["reproduced"] is False
    assert d0["tolerance"] == pytest.approx(max(0.05, 2 * 0.05))  # dapo lasts 0.50, 0.55, 0.45: std 0.05
    assert rr[("dapo", 1)]["difference"] == 0 and rr[("dapo", 1)]["reproduced"] is True
    assert after["reruns"]["all_reproduced"] is False
    assert "| DAPO | 0 | 70.0 | 50.0 | -20.0 | 10.0 | NO |" in (study_out / "comparison.md").read_text()
    strip = lambda r: {k: v for k, v in r.items() if k != "recorded_in"}  # noqa: E731
    strip = lambda r: {k: v for k, v in r.items() if k not in ("recorded_in", "curves")}  # noqa: E731
    assert sorted(map(strip, after["runs"]), key=key) == sorted(map(strip, before["runs"]), key=key)
    assert (study_out / "comparison.png").stat().st_size > 10_000
    # another setting's JSON is refused, naming the key
    other = dict(before, overrides=["optim.lr=1e-3"])
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert _cli([*argv, "--earlier-json", str(tmp_path / "other.json")]) == 2
    assert "optim.lr: 0.001 there, 0.0002 here" in capsys.readouterr().err


def test_a_broken_seed_pair_is_refused_naming_the_run(tmp_path, capsys):
    """Runs with one seed must have drawn the same first batch (step 1's fingerprint): one that
    did not is named, and the report is refused unless --allow-broken-pairs, which says so."""
    out = tmp_path / "study"
    for algo, lasts in STUDY_LAST.items():
        for seed, last in enumerate(lasts):
            odd = (algo, seed) == ("rpg_reinforce_ufkl", 1)
            _study_run(out, algo, seed, last, kl=0.01, iw=5.0, digest=0xABC if odd else None)
    argv = ["compare", "--algorithms", *STUDY_LAST, "--seeds", "3", "--out", str(out), "--report-only"]
    assert _cli(argv) == 2
    err = capsys.readouterr().err
    assert "seed 1: the runs drew different first batches" in err and "rpg_reinforce_ufkl/seed1: 000000000abc" in err
    assert "--allow-broken-pairs" in err
    assert _cli([*argv, "--allow-broken-pairs"]) == 0
    md = (out / "comparison.md").read_text()
    assert "Broken pairs" in md and "rpg_reinforce_ufkl/seed1" in md
    study = json.loads((out / "study.json").read_text())
    assert study["pairing"]["checked"] == 12 and len(study["pairing"]["broken"]) == 1


@pytest.mark.medium
def test_plan_runs_every_arm_paired_and_reports_the_declared_tests(tiny_overrides, tmp_path, capsys):
    """``rpgrl compare --plan``: each arm (a preset plus its own keys) x its seeds, in the tiny
    setting; runs with one seed drew the same first batch whatever the arm (the fingerprint is
    in metrics.jsonl at every step); each run records its code version; the report holds the
    plan's hypotheses with their declared tests."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""
overrides: {json.dumps(tiny_overrides("trainer.eval_every=1"))}
arms:
  dapo: {{preset: dapo, seeds: 0-1}}
  reinforce_std_adv: {{preset: rpg_reinforce_ufkl, set: {{algorithm.advantage: grpo}}, seeds: 0-1}}
hypotheses:
  - {{id: H1, test: paired_t, contrast: {{reinforce_std_adv: 1, dapo: -1}}, question: "loss, advantage fixed"}}
  - {{id: H1eq, test: tost, margin: 0.5, contrast: {{reinforce_std_adv: 1, dapo: -1}}}}
""")
    out = tmp_path / "out"
    # two processes share the study (--part): each trains every other run and reports nothing
    base = ["compare", "--plan", str(plan), "--out", str(out), "--shared-before", "--resume"]
    assert _cli([*base, "--part", "2/2"]) == 0
    assert sorted(str(p.relative_to(out)) for p in out.glob("*/seed*/summary.json")) == [
        "dapo/seed1/summary.json", "reinforce_std_adv/seed1/summary.json"]
    assert not (out / "study.json").exists() and "--report-only instead of --part" in capsys.readouterr().out
    assert _cli([*base, "--part", "1/2"]) == 0 and not (out / "study.json").exists()
    assert _cli([*base, "--report-only"]) == 0
    assert _cli([*base, "--part", "3/2"]) == 2 and "K must be in 1..N" in capsys.readouterr().err
    for arm in ("dapo", "reinforce_std_adv"):
        cfg = yaml.safe_load((out / arm / "seed0" / "config.yaml").read_text())["algorithm"]
        assert (cfg["loss"], cfg["advantage"]) == ({"dapo": "ppo", "reinforce_std_adv": "rpg_reinforce_ufkl"}[arm], "grpo")
    study = json.loads((out / "study.json").read_text())
    runs = {(r["algorithm"], r["seed"]): r for r in study["runs"]}
    assert len(runs) == 4 and study["pairing"] == {"broken": [], "unverified": [], "checked": 4}
    for seed in (0, 1):
        assert runs[("dapo", seed)]["first_batch_digest"] == runs[("reinforce_std_adv", seed)]["first_batch_digest"]
    assert runs[("dapo", 0)]["first_batch_digest"] != runs[("dapo", 1)]["first_batch_digest"]
    code = runs[("dapo", 0)]["code"]
    assert code["rpgrl"] and len(code["commit"]) == 40 and isinstance(code["dirty"], bool)
    h1, h1eq = study["hypotheses"]["tests"]
    assert h1["n"] == 2 and h1["test"] == "paired_t" and "p_adjusted" in h1 and h1eq["margin"] == 0.5
    md = (out / "comparison.md").read_text()
    assert "## Pre-registered hypotheses" in md and "| H1 | paired_t |" in md
    assert "Every seed's runs drew the same first batch" in md
    assert study["plan"]["arms"]["reinforce_std_adv"]["set"] == {"algorithm.advantage": "grpo"}
