"""The real-model study's ablations (docs/benchmarks.md §4, "Ablations"): arms of one method,
each differing from the study's own runs of that method in the keys it names, compared
paired by seed.

Each arm is a folder of ``rpgrl compare`` runs (``OUT/<method>/seed<k>``), made with the
study config plus the arm's overrides, e.g.

    rpgrl compare configs/real/study.yaml algorithm.beta=1e-3 --algorithms rpg_reinforce_ufkl \\
        --seeds 0,1,2 --out runs/ablation/beta1e-3 --resume --isolate --prune-checkpoints

This script reads the baseline (the study's runs of the method) and the arms, checks that
each arm's config differs from the baseline's in exactly the keys it reports (the per-run
keys of ``rpgrl compare`` aside), and writes a markdown table and a JSON of: last held-out
accuracy with its 95 % t-interval, the paired difference to the baseline with its interval,
and the arm's stability and cost (largest KL to the anchor, clip fraction, largest
importance weight, peak RSS, wall time).

    python benchmarks/study_ablation.py --baseline runs/study --method rpg_reinforce_ufkl \\
        --arm beta1e-3=runs/ablation/beta1e-3 --arm anchor_fixed=runs/ablation/anchor_fixed \\
        --json docs/results/real-study-ablations.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from rpgrl.tools.compare import PER_RUN_KEYS, config_differences
from rpgrl.tools.compare_report import fill_shared_before, run_result, runs_max, runs_mean, shared_baseline
from rpgrl.tools.stats import paired_difference, t_interval


def _runs(out: Path, method: str) -> list[dict]:
    runs = [run_result(s.parent) for s in sorted((out / method).glob("seed*/summary.json"))]
    if not runs:
        raise SystemExit(f"study_ablation: no finished run of {method} under {out} (expected {out}/{method}/seed<k>)")
    return sorted(runs, key=lambda r: r["seed"])


def _config(run: dict) -> dict:
    return yaml.safe_load((Path(run["run_dir"]) / "config.yaml").read_text()) or {}


def arm_row(name: str, runs: list[dict], base: list[dict], keys: dict) -> dict:
    last = t_interval([r["last"] for r in runs])
    diff = paired_difference({r["seed"]: r["last"] for r in runs}, {r["seed"]: r["last"] for r in base})
    return {"arm": name, "differs_in": keys, "seeds": [r["seed"] for r in runs], "last": last.to_dict(),
            "last_minus_baseline": diff.to_dict(), "kl_anchor_max": runs_max(runs, "kl_anchor_max"),
            "clipfrac_mean": runs_mean(runs, "clipfrac_mean"), "importance_weight_max": runs_max(runs, "importance_weight_max"),
            "peak_rss_mb": runs_max(runs, "peak_rss_mb"), "wall_s": runs_mean(runs, "wall_s"),
            "runs": [{k: r[k] for k in ("seed", "before", "last", "best", "kl_anchor_max", "clipfrac_mean",
                                        "importance_weight_max", "peak_rss_mb", "wall_s", "run_command")}
                     for r in runs]}


def _ci(d: dict, signed: bool = False) -> str:
    f = (lambda x: f"{100 * x:+.1f}") if signed else (lambda x: f"{100 * x:.1f}")
    if d["n"] == 0:
        return "n/a"
    return f"{f(d['mean'])} ({d['n']} seed)" if d["n"] < 2 else f"{f(d['mean'])} [{f(d['lo'])}, {f(d['hi'])}]"


def markdown(rows: list[dict], method: str) -> str:
    lines = [f"| {method} arm | Differs in | Seeds | Last (%) | Last − baseline (pts) | Max KL to anchor | "
             "Clip fraction mean (%) | Max importance weight | Peak RSS (MiB) | Wall time per run (s) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        keys = ", ".join(f"`{k}={v[0]}`" for k, v in r["differs_in"].items()) or "(baseline)"
        delta = "—" if not r["differs_in"] else _ci(r["last_minus_baseline"], True)
        lines.append(f"| {r['arm']} | {keys} | {','.join(map(str, r['seeds']))} | {_ci(r['last'])} | {delta} | "
                     f"{r['kl_anchor_max']:.3g} | {100 * r['clipfrac_mean']:.1f} | {r['importance_weight_max']:.3g} | "
                     f"{r['peak_rss_mb']:.0f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", required=True, type=Path, help="the study's --out (holds METHOD/seed<k>)")
    ap.add_argument("--method", default="rpg_reinforce_ufkl")
    ap.add_argument("--arm", action="append", default=[], metavar="NAME=OUT", help="an arm's --out folder")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    base = _runs(args.baseline, args.method)
    arms = [(n, _runs(Path(o), args.method)) for n, o in (a.split("=", 1) for a in args.arm)]
    everything = {"baseline": base, **{n: r for n, r in arms}}
    fill_shared_before(everything, shared_baseline(everything))
    ref = _config(base[0])
    ignore = (*PER_RUN_KEYS,)
    rows = [arm_row("baseline (the study's runs)", base, base, {})]
    for name, runs in arms:
        diffs = [config_differences(_config(r), ref, ignore=ignore) for r in runs]
        if any(d != diffs[0] for d in diffs):
            raise SystemExit(f"study_ablation: the runs of arm {name} were made with different settings: {diffs}")
        rows.append(arm_row(name, runs, base, {k: list(v) for k, v in diffs[0].items()}))
    md = markdown(rows, args.method)
    print(md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {"command": "python benchmarks/study_ablation.py " + " ".join(argv), "method": args.method,
               "rule": "paired by seed with the study's own runs of the method; 95 % t-intervals", "arms": rows}
        clean = json.loads(json.dumps(out, default=str).replace("NaN", "null"))
        args.json.write_text(json.dumps(clean, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
