"""``rpgrl compare`` and ``rpgrl plot``: several algorithms x seeds, side by side.

``compare`` trains every (algorithm, seed) pair one after another through the same
``Trainer`` as ``rpgrl train`` (only ``algorithm.preset``, ``seed`` and ``output_dir`` differ),
then writes the paper's table layout (docs/math.md §8: held-out accuracy "last" and "best",
mean ± std over seeds) to ``comparison.md`` and the training curves of docs/math.md §7
(one line per algorithm, a band over seeds) to ``comparison.png``.

Seeds and the warm start: the tiny model's warm start is keyed by ``seed``
(``rpgrl.models.warmstart``), so seed k is warm-started once (by the first algorithm) and every
other algorithm at seed k reuses the cached model. All algorithms of one seed therefore
start from the *same* policy (a paired comparison); different seeds also vary the starting
policy, which is part of the seed-to-seed spread the table reports.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from rpgrl.loop.metrics import EVAL_ACCURACY
from rpgrl.loop.tracking import is_finite_number, read_metrics

__all__ = ["add_subcommands", "compare", "format_table", "main", "plot_runs", "run_result"]

ACCURACY_KEY = EVAL_ACCURACY


# --------------------------------------------------------------------------- one run's numbers


def run_result(run_dir: str | Path) -> dict[str, Any]:
    """Numbers of one finished run: before-RL, last and best held-out accuracy, wall time.

    "best" is the maximum of ``eval/accuracy`` over the evaluations *after* step 0 in
    ``metrics.jsonl`` (step 0 is the before-RL evaluation, reported in its own column, so
    best >= before is not forced); a run evaluated only at the end has best == last.
    """

    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} does not exist: is {run_dir} a finished rpgrl run?")
    summary = json.loads(summary_path.read_text())
    evals = [(int(r["step"]), float(r[ACCURACY_KEY])) for r in read_metrics(run_dir)
             if is_finite_number(r.get(ACCURACY_KEY))]
    last = float(summary["eval_after"]["accuracy"])
    after = [v for s, v in evals if s > 0]
    return {
        "run_dir": str(run_dir),
        "algorithm": algorithm_of(run_dir),
        "before": float(summary.get("eval_before", {}).get("accuracy", math.nan)),
        "last": last,
        "best": max(after) if after else last,
        # RL training + evaluation only: the warm start is shared by every algorithm of a seed
        "wall_seconds": float(summary.get("train_seconds", summary.get("wall_seconds", math.nan))),
        "steps": int(summary.get("steps", 0)),
    }


def algorithm_of(run_dir: str | Path) -> str:
    """A run's algorithm: summary.json "algorithm", else config.yaml algorithm.preset, else the dir name."""
    run_dir = Path(run_dir)
    summary = run_dir / "summary.json"
    if summary.is_file():
        name = json.loads(summary.read_text()).get("algorithm")
        if name:
            return str(name)
    config = run_dir / "config.yaml"
    if config.is_file():
        name = ((yaml.safe_load(config.read_text()) or {}).get("algorithm") or {}).get("name")
        if name:
            return str(name)
    return run_dir.name


# --------------------------------------------------------------------------- the table


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for a single seed) of the finite values."""
    vals = [v for v in values if is_finite_number(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _pm(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    mean, std = _stats(values)
    if not math.isfinite(mean):
        return "n/a"
    if len([v for v in values if is_finite_number(v)]) == 1:
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def format_table(results: dict[str, list[dict]]) -> str:
    """Markdown table, rows = algorithms; accuracies in %, mean ± std (ddof=1) over seeds."""
    lines = [
        "| Algorithm | Seeds | Steps | Before RL (%) | Last (%) | Best (%) | Wall time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for algo, runs in results.items():
        def col(k, runs=runs):
            return [r[k] for r in runs]

        steps = sorted({r["steps"] for r in runs})
        lines.append(
            f"| {algo} | {len(runs)} | {'/'.join(map(str, steps))} | {_pm(col('before'))} | "
            f"{_pm(col('last'))} | {_pm(col('best'))} | {_pm(col('wall_seconds'), 1.0, 0)} |"
        )
    return "\n".join(lines)


def _markdown(results: dict[str, list[dict]], header: list[str]) -> str:
    return "\n".join([
        "# Algorithm comparison", "",
        *header, "",
        format_table(results), "",
        "Held-out accuracy of greedy decoding on the held-out split. *Last*: after the final "
        "step; *Best*: maximum over the run's evaluations after step 0 (trainer.eval_every); "
        "mean ± sample std over seeds. Curves: comparison.png (band = min-max over seeds).", "",
        "Runs:", "",
        *[f"- {a} seed {i}: `{r['run_dir']}`" for a, runs in results.items() for i, r in enumerate(runs)],
        "",
    ])


# --------------------------------------------------------------------------- compare / plot


def _run_dir(out_dir: Path, algo: str, seed: int) -> Path:
    return out_dir / algo / f"seed{seed}"


def compare(
    algorithms: list[str], seeds: int, config_path: str | None, overrides: list[str],
    out_dir: str | Path, *, resume: bool = False, band: str = "minmax", log: Callable = print,
) -> dict[str, Any]:
    """Train each algorithm x seed (0..seeds-1) sequentially, then write the table and figure.

    Every config is built and validated before the first run starts, so a typo fails in
    seconds rather than after hours. A run dir that already holds metrics would be appended
    to, so it is refused unless ``resume``: then finished runs (summary.json) are reused and
    unfinished ones continue from their latest checkpoint.

    Returns ``{"results": {algo: [run_result per seed]}, "markdown": path, "png": path}``.
    """
    from rpgrl.config import ConfigError, load_config
    from rpgrl.loop.trainer import Trainer

    if not algorithms:
        raise ConfigError("compare: give at least one algorithm (--algorithms grpo rpg_reinforce_ufkl ...)")
    if len(set(algorithms)) != len(algorithms):
        raise ConfigError(f"compare: --algorithms lists a name twice: {algorithms}")
    if seeds < 1:
        raise ConfigError(f"compare: --seeds must be >= 1, got {seeds}")
    from rpgrl.config import PRESETS
    from rpgrl.losses import LOSSES

    out = Path(out_dir)
    plan = []
    for algo in algorithms:
        # a preset, or a loss name (built-in, entry point, module:function) run with the
        # default preset's hyper-parameters and the shared overrides
        select = f"algorithm.preset={algo}" if algo in PRESETS or algo not in LOSSES else f"algorithm.loss={algo}"
        for seed in range(seeds):
            run_dir = _run_dir(out, algo.replace(":", "_"), seed)
            cfg = load_config(config_path, [*overrides, select, f"seed={seed}", f"output_dir={run_dir}"])
            if not resume and (run_dir / "metrics.jsonl").exists():
                raise ConfigError(f"compare: {run_dir} already holds a run; pass --resume to reuse/continue "
                                  "it, or choose another --out")
            plan.append((algo, seed, cfg))
    results: dict[str, list[dict]] = {a: [] for a in algorithms}
    for i, (algo, seed, cfg) in enumerate(plan, 1):
        run_dir = Path(cfg.output_dir)
        if resume and (run_dir / "summary.json").is_file():
            log(f"[compare {i}/{len(plan)}] {algo} seed {seed}: finished earlier, reusing {run_dir}")
        else:
            log(f"[compare {i}/{len(plan)}] {algo} seed {seed} -> {run_dir}")
            Trainer(cfg, resume=resume, log=log).train()
        results[algo].append({**run_result(run_dir), "algorithm": algo})
    header = [f"Config: `{config_path or '(CPU default)'}`; overrides: "
              f"`{' '.join(overrides) or '(none)'}`; seeds 0..{seeds - 1}."]
    md = out / "comparison.md"
    md.write_text(_markdown(results, header))
    (out / "comparison.json").write_text(json.dumps(results, indent=2))
    png = _plot(results, out / "comparison.png", band)
    log(format_table(results))
    log(f"comparison: {md}; curves: {png}")
    return {"results": results, "markdown": str(md), "png": str(png)}


def _plot(results: dict[str, list[dict]], out_png: Path, band: str) -> Path:
    from rpgrl.tools.plots import plot_comparison

    runs = {algo: [r["run_dir"] for r in rs] for algo, rs in results.items()}
    return plot_comparison(runs, out_png, band=band)


def plot_runs(run_dirs: list[str | Path], out_png: str | Path, *, band: str = "minmax") -> dict[str, list[str]]:
    """``comparison.png`` of existing run dirs, grouped by algorithm (one line + seed band each).

    Runs of the same algorithm name are treated as seeds of one setting even if their
    other hyper-parameters differ; plot such runs separately. Returns the grouping.
    """
    from rpgrl.tools.plots import plot_comparison

    if not run_dirs:
        raise ValueError("plot: give at least one run directory")
    groups: dict[str, list[str]] = {}
    for d in run_dirs:
        d = Path(d)
        if not (d / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"plot: {d} has no metrics.jsonl (expected an rpgrl run directory)")
        groups.setdefault(algorithm_of(d), []).append(str(d))
    plot_comparison(groups, out_png, band=band)
    return groups


# --------------------------------------------------------------------------- CLI


def _compare_cmd(args: argparse.Namespace) -> int:
    from rpgrl.config import ConfigError, split_config_args
    from rpgrl.loop.trainer import TrainingError

    # "--algorithms A B cfg.yaml k=v": nargs="+" swallows what follows; give it back to items.
    moved = [a for a in args.algorithms if "=" in a or a.endswith((".yaml", ".yml"))]
    algorithms = [a for a in args.algorithms if a not in moved]
    try:
        config_path, overrides = split_config_args(moved + args.items)
        compare(algorithms, args.seeds, config_path, overrides, args.out, resume=args.resume,
                band=args.band)
    except (ConfigError, ValueError) as exc:
        print(f"rpgrl compare: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"rpgrl compare: training stopped: {exc}", file=sys.stderr)
        return 1
    return 0


def _plot_cmd(args: argparse.Namespace) -> int:
    try:
        groups = plot_runs(args.run_dirs, args.out, band=args.band)
    except (FileNotFoundError, ValueError) as exc:
        print(f"rpgrl plot: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: " + "; ".join(f"{a} ({len(d)} run{'s' * (len(d) > 1)})" for a, d in groups.items()))
    return 0


def add_subcommands(subparsers) -> None:
    """Register ``compare`` and ``plot`` on an ``add_subparsers()`` object (rpgrl.cli)."""
    c = subparsers.add_parser("compare", help="train several algorithms x seeds; table + comparison.png")
    c.add_argument("--algorithms", nargs="+", required=True, metavar="NAME",
                   help="algorithm presets (algorithm.preset), e.g. grpo dapo rpg_reinforce_ufkl, or loss "
                        "names (algorithm.loss: an rpgrl.losses entry point or module:function)")
    c.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per algorithm (default 3)")
    c.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value",
                   help="an optional YAML config, then dotted overrides shared by every run")
    c.add_argument("--out", default="runs/compare", help="runs go to OUT/<algorithm>/seed<k>")
    c.add_argument("--resume", action="store_true",
                   help="reuse finished runs under --out and continue unfinished ones from checkpoints")
    c.add_argument("--band", choices=("minmax", "std"), default="minmax", help="seed band in the figure")
    c.set_defaults(func=_compare_cmd)
    p = subparsers.add_parser("plot", help="comparison.png of existing run directories")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default="comparison.png", help="output PNG (default comparison.png)")
    p.add_argument("--band", choices=("minmax", "std"), default="minmax")
    p.set_defaults(func=_plot_cmd)


def main(argv: list[str] | None = None) -> int:
    """``python -m rpgrl.tools.compare compare|plot ...`` (the same as ``rpgrl compare|plot``)."""
    parser = argparse.ArgumentParser(prog="rpgrl")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
