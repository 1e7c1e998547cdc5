"""``rpgrl compare`` / ``rpgrl plot``: the table's numbers (hand-made runs) and the CLI end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

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
    assert algorithm_of(d) == "rpg_fkl"
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
