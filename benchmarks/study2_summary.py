"""The numbers docs/benchmarks.md quotes for round 2 of the real-model study, recomputed from the
study's JSON alone: per arm, the accuracy figures (last, area under the curve, strict form), the
per-step curves of the stability metrics (mean over seeds), cost, and the pre-registered tests.

    python benchmarks/study2_summary.py docs/results/real-study-2.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from rpgrl.loop import metrics as M
from rpgrl.tools.hypotheses import auc
from rpgrl.tools.stats import t_interval

#: per-step curves summarised per arm (mean over seeds at each step)
CURVES = {"entropy": M.ENTROPY, "length": M.LENGTH_MEAN, "kl_share": M.KL_SHARE,
          "max_w": M.actor("importance_weight_max"), "kl_anchor": M.KL_ANCHOR, "reward": M.REWARD}


def mean_ci(values: list[float]) -> str:
    """Mean [95 % t-interval] in percent, the interval rpgrl compare's tables use."""
    ci = t_interval(values)
    if ci.n < 2:
        return f"{100 * ci.mean:.1f}" if ci.n else "n/a"
    return f"{100 * ci.mean:.1f} [{100 * ci.lo:.1f}, {100 * ci.hi:.1f}]"


def machine(run: dict) -> str:
    m = run.get("machine") or {}
    return m if isinstance(m, str) else f"{m.get('cpu', '?')} / {m.get('cpu_capability', '?')} / torch {m.get('torch', '?')}"


def step_means(runs: list[dict], key: str) -> list[tuple[int, float]]:
    per: dict[int, list[float]] = {}
    for r in runs:
        for s, v in (r.get("curves") or {}).get(key, []):
            if isinstance(v, (int, float)) and math.isfinite(v):
                per.setdefault(int(s), []).append(float(v))
    return [(s, float(np.mean(v))) for s, v in sorted(per.items())]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study_json")
    args = ap.parse_args(argv)
    study = json.loads(Path(args.study_json).read_text())
    arms: dict[str, list[dict]] = {}
    for r in study["runs"]:
        arms.setdefault(r["algorithm"], []).append(r)
    print("| arm | seeds | last (%) | AUC steps 2-8 (%) | strict last (%) | step s | run min | peak RSS MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for arm, runs in arms.items():
        runs.sort(key=lambda r: r["seed"])
        print(f"| {arm} | {','.join(str(r['seed']) for r in runs)} | {mean_ci([r['last'] for r in runs])} | "
              f"{mean_ci([auc(r) for r in runs])} | {mean_ci([r['strict_last'] for r in runs])} | "
              f"{np.mean([r['step_seconds_mean'] for r in runs]):.1f} | "
              f"{np.mean([r['process_wall_s'] for r in runs]) / 60:.1f} | {max(r['peak_rss_mb'] for r in runs):.0f} |")
    print()
    for name, key in CURVES.items():
        print(f"{name} ({key}), mean over seeds per step:")
        for arm, runs in arms.items():
            print(f"  {arm:28s} " + " ".join(f"{v:.3g}" for _, v in step_means(runs, key)))
    print()
    wall = sum(r["process_wall_s"] for r in study["runs"])
    print(f"runs: {len(study['runs'])}; sum of process wall time {wall / 3600:.2f} h "
          f"(two side by side: about {wall / 7200:.2f} h of the machine)")
    print("machines:", sorted({machine(r) for r in study["runs"]}))
    print("code:", {k: len(v) for k, v in (study.get("code") or {}).items()})
    p = study.get("pairing") or {}
    print(f"pairing: {p.get('checked')} runs checked, broken {p.get('broken')}, unverified {p.get('unverified')}")
    hyp = study.get("hypotheses") or {}
    print(f"\nhypotheses ({hyp.get('correction')}, family {hyp.get('family_size')}):")
    for t in hyp.get("tests", []):
        t = {k: (math.nan if v is None else v) for k, v in t.items()}
        print(f"  {t['id']:14s} {t['test']:8s} {t['metric']:11s} n={t['n']} mean {100 * t['mean']:+.2f} "
              f"[{100 * t['lo']:+.2f}, {100 * t['hi']:+.2f}] ({100 * t['ci_level']:.0f} %) p={t['p']:.3g} "
              f"adj={t.get('p_adjusted', float('nan')):.3g} perm={t.get('p_permutation', float('nan')):.3g} "
              f"-> {t['outcome']}; values {[round(100 * v, 1) for v in t['values']]}")


if __name__ == "__main__":
    main()
