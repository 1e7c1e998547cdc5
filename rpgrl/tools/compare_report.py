"""What ``rpgrl compare`` reports: one run's numbers from its folder, and the study's tables.

Everything here reads finished run folders (``summary.json``, ``metrics.jsonl``, and the
``compare_run.json`` that ``rpgrl compare`` writes beside them), so a report can be rebuilt
at any time from whatever runs have finished, chunk by chunk.

Per method: held-out accuracy "last" and "best" as a mean with a 95 % t-interval over
seeds; the paired (same seed) difference to DAPO and to GRPO with its interval; stability
(the largest drop between consecutive evaluations, skipped optimizer steps, the largest
KL to the anchor, clip fractions, the largest importance weight); cost (peak RSS, wall
time). The verdict line is computed from the paired intervals (``rpgrl.tools.stats.verdict``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from rpgrl.loop import metrics as M
from rpgrl.tools.stats import Interval, paired_difference, t_interval, verdict
from rpgrl.loop.tracking import is_finite_number, read_metrics

__all__ = ["BASELINES", "CURVE_KEYS", "LABELS", "RUN_INFO", "VERDICT_CLAIMS", "code_versions", "collect_finished",
           "curve_records", "label", "markdown_report", "pairing_problems", "rerun_check", "run_result",
           "study_summary"]

#: written by ``rpgrl compare`` into each run folder: how the run was launched and measured
RUN_INFO = "compare_run.json"
#: the paper's names of rpgrl's presets (configs/paper/)
LABELS = {"grpo": "GRPO", "dapo": "DAPO", "rpg_ufkl": "RPG-UFKL", "rpg_urkl": "RPG-URKL",
          "rpg_fkl": "RPG-FKL", "rpg_rkl": "RPG-RKL", "rpg_reinforce_ufkl": "RPG-REINFORCE-UFKL",
          "rpg_reinforce_urkl": "RPG-REINFORCE-URKL", "rpg_reinforce_fkl": "RPG-REINFORCE-FKL",
          "rpg_reinforce_rkl": "RPG-REINFORCE-RKL"}
#: every method's paired difference is reported against these (when they were run)
BASELINES = ("dapo", "grpo")
#: the paper's claim, RPG-REINFORCE-UFKL/URKL >= DAPO >= GRPO, as (better, worse) pairs
VERDICT_CLAIMS = (("rpg_reinforce_ufkl", "dapo"), ("rpg_reinforce_urkl", "dapo"), ("dapo", "grpo"))
_CLIPFRAC_TOTAL = "clipfrac_total"
#: per-step metrics of the comparison figure (besides held-out accuracy), kept per run
CURVE_KEYS = (M.REWARD, M.ENTROPY, M.LENGTH_MEAN, M.KL_ANCHOR, *M.CLIPFRACS, M.KL_SHARE,
              M.actor("importance_weight_max"), M.EVAL_STRICT_ACCURACY)


def label(algo: str) -> str:
    return LABELS.get(algo, algo)


# --------------------------------------------------------------------------- one run


def _series(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of the finite values of ``key``, the last one per step, by step."""
    per: dict[int, float] = {}
    for r in records:
        if is_finite_number(r.get(key)):
            per[int(r["step"])] = float(r[key])
    return sorted(per.items())


def _max(vals: list[float]) -> float:
    return max(vals) if vals else math.nan


def _mean(vals: list[float]) -> float:
    return sum(vals) / len(vals) if vals else math.nan


def runs_max(runs: list[dict], key: str) -> float:
    """Largest finite ``key`` over runs (nan if none): a run that never logged it does not count."""
    return _max([r[key] for r in runs if is_finite_number(r.get(key))])


def runs_mean(runs: list[dict], key: str) -> float:
    """Mean of the finite ``key`` over runs (nan if none)."""
    return _mean([r[key] for r in runs if is_finite_number(r.get(key))])


def max_drop(curve: list[float]) -> float:
    """Largest fall between consecutive values (0 if the curve never falls; nan if < 2 points)."""
    if len(curve) < 2:
        return math.nan
    return max(0.0, max(a - b for a, b in zip(curve, curve[1:])))


def _seed_of(run_dir: Path, info: dict) -> int:
    if "seed" in info:
        return int(info["seed"])
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        seed = (yaml.safe_load(cfg.read_text()) or {}).get("seed")
        if seed is not None:
            return int(seed)
    m = re.fullmatch(r"seed(\d+)", run_dir.name)
    return int(m.group(1)) if m else 0


def run_info(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RUN_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def algorithm_of(run_dir: str | Path) -> str:
    """A run's algorithm: summary.json "algorithm", else config.yaml algorithm.preset (``name``
    in configs written before the key was renamed), else the dir name."""
    run_dir = Path(run_dir)
    summary = run_dir / "summary.json"
    if summary.is_file():
        name = json.loads(summary.read_text()).get("algorithm")
        if name:
            return str(name)
    config = run_dir / "config.yaml"
    if config.is_file():
        algo = (yaml.safe_load(config.read_text()) or {}).get("algorithm") or {}
        name = algo.get("preset") or algo.get("name")
        if name:
            return str(name)
    return run_dir.name


def run_result(run_dir: str | Path) -> dict[str, Any]:
    """Numbers of one finished run (``summary.json`` must exist).

    "best" is the maximum of ``eval/accuracy`` over the evaluations *after* step 0 (step 0
    is the before-RL evaluation, reported in its own column, so best >= before is not
    forced); a run evaluated only at the end has best == last. ``max_accuracy_drop`` is the
    largest fall of held-out accuracy between consecutive evaluations, step 0 included.
    """
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} does not exist: is {run_dir} a finished rpgrl run?")
    summary = json.loads(summary_path.read_text())
    info = run_info(run_dir)
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    evals = _series(records, M.EVAL_ACCURACY)
    last = float(summary["eval_after"]["accuracy"])
    after = [v for s, v in evals if s > 0]
    clip_total: dict[int, float] = {}
    for key in M.CLIPFRACS:
        for s, v in _series(records, key):
            clip_total[s] = clip_total.get(s, 0.0) + v
    opt_steps = [v for _, v in _series(records, M.OPTIMIZER_STEPS)]
    skipped = summary.get("skipped_steps")
    if skipped is None:
        skipped = _max([v for _, v in _series(records, M.SKIPPED_STEPS_TOTAL)])
    # the trainer logs each evaluation's problem count as eval/overall/n_problems
    n_heldout = _series(records, "eval/overall/n_problems")
    n_heldout = n_heldout[-1][1] if n_heldout else (summary.get("eval_best_last") or {}).get("last", {}).get(
        "eval/overall/n_problems", math.nan)
    rss = info.get("peak_rss_mb")
    if rss is None:  # in-process compare: the process's peak so far (earlier runs included)
        rss = _max([v for _, v in _series(records, M.PEAK_RSS)])
    return {
        "run_dir": str(run_dir),
        "algorithm": info.get("algorithm") or algorithm_of(run_dir),
        "seed": _seed_of(run_dir, info),
        "before": float(summary.get("eval_before", {}).get("accuracy", math.nan)),
        "before_source": "own",
        "last": last,
        "best": max(after) if after else last,
        "strict_before": float(summary.get("eval_before", {}).get("strict_acc", math.nan)),
        "strict_last": float(summary["eval_after"].get("strict_acc", math.nan)),
        "steps": int(summary.get("steps", 0)),
        "n_heldout": int(n_heldout) if is_finite_number(n_heldout) else None,
        "optimizer_steps_per_batch": _mean(opt_steps),
        "optimizer_steps_per_batch_min": min(opt_steps) if opt_steps else math.nan,
        "max_accuracy_drop": max_drop([v for _, v in evals]),
        "skipped_steps": int(skipped) if is_finite_number(skipped) else 0,
        "kl_anchor_max": _max([v for _, v in _series(records, M.KL_ANCHOR)]),
        "importance_weight_max": _max([v for _, v in _series(records, M.actor("importance_weight_max"))]),
        "clipfrac_mean": _mean(list(clip_total.values())),
        "clipfrac_max": _max(list(clip_total.values())),
        "gen_batches_mean": _mean([v for _, v in _series(records, M.GEN_BATCHES)]),
        "kept_groups_mean": _mean([v for _, v in _series(records, M.KEPT_GROUPS)]),
        "step_seconds_mean": _mean([v for s, v in _series(records, M.TIMING_STEP) if s > 1]),
        "peak_rss_mb": float(rss) if is_finite_number(rss) else math.nan,
        "peak_rss_source": info.get("peak_rss_source") or (
            RUN_INFO if "peak_rss_mb" in info else "memory/peak_rss_mb (the process's peak so far)"),
        # the trainer's own clock: model load, evaluations and RL steps (not Python start-up)
        "wall_s": float(summary.get("wall_seconds", math.nan)),
        "wall_seconds": float(summary.get("train_seconds", summary.get("wall_seconds", math.nan))),
        "process_wall_s": info.get("process_wall_s"),
        "eval_curve": [[s, v] for s, v in evals],
        # the figure's per-step curves, kept in study.json so that a report rebuilt from the
        # JSON alone (``rpgrl compare --earlier-json``) still draws them
        "curves": {k: [[s, v] for s, v in _series(records, k)] for k in CURVE_KEYS},
        "run_command": info.get("run_command"),
        # torch, CPU, kernel level and threads: a rerun is bit-for-bit only where these match
        "machine": summary.get("machine"),
        # the code the run ran (commit, dirty), recorded by the run itself at its start
        "code": summary.get("code"),
        # the fingerprint of step 1's first generation round: runs with one seed must agree
        "first_batch_digest": _first_digest(records),
    }


def _first_digest(records: list[dict]) -> int | None:
    series = _series(records, M.FIRST_ROUND_DIGEST)
    return int(series[0][1]) if series and series[0][0] == 1 else None


def pairing_problems(results: dict[str, list[dict]]) -> tuple[list[str], list[str]]:
    """(broken, unverified): runs with the same seed must have drawn the same first batch (the same
    initial policy, prompt stream and random streams; the batch is drawn before any update). Each
    broken entry names the seed and every run's fingerprint; ``unverified`` lists runs that
    recorded none (made before the fingerprint existed, or reported from an earlier JSON)."""
    by_seed: dict[int, dict[int, list[str]]] = {}
    unverified = []
    for algo, runs in results.items():
        for r in runs:
            name = f"{algo}/seed{r['seed']}"
            digest = r.get("first_batch_digest")
            if not is_finite_number(digest):
                unverified.append(name)
            else:
                by_seed.setdefault(int(r["seed"]), {}).setdefault(int(digest), []).append(name)
    broken = []
    for seed, groups in sorted(by_seed.items()):
        if len(groups) > 1:
            parts = "; ".join(f"{', '.join(names)}: {digest:012x}" for digest, names in
                              sorted(groups.items(), key=lambda kv: -len(kv[1])))
            broken.append(f"seed {seed}: the runs drew different first batches ({parts})")
    return broken, unverified


def code_versions(results: dict[str, list[dict]]) -> dict[str, list[str]]:
    """commit (+ "-dirty") -> the runs made with it; "unrecorded" for runs without a record."""
    out: dict[str, list[str]] = {}
    for algo, runs in results.items():
        for r in runs:
            code = r.get("code") or {}
            key = code.get("commit") or "unrecorded"
            if code.get("dirty"):
                key += "-dirty"
            out.setdefault(key, []).append(f"{algo}/seed{r['seed']}")
    return out


def curve_records(run: dict) -> list[dict]:
    """metrics.jsonl-like records rebuilt from a run's ``eval_curve`` and ``curves`` (what the
    figure draws of a run known only from study.json)."""
    rows: dict[int, dict] = {}
    for key, series in [(M.EVAL_ACCURACY, run.get("eval_curve") or []), *(run.get("curves") or {}).items()]:
        for s, v in series:
            rows.setdefault(int(s), {"step": int(s)})[key] = v
    return [rows[s] for s in sorted(rows)]


def shared_baseline(results: dict[str, list[dict]]) -> dict | None:
    """The one before-RL evaluation a study with ``--shared-before`` measures: the first run
    (by algorithm, then seed) that evaluated before training. Valid for every run because the
    held-out split does not depend on the seed and greedy decoding of the same initial
    weights gives the same replies."""
    for algo in sorted(results):
        for r in results[algo]:
            if is_finite_number(r["before"]):
                return {"run": f"{algo}/seed{r['seed']}", "before": r["before"],
                        "strict_before": r["strict_before"]}
    return None


def fill_shared_before(results: dict[str, list[dict]], baseline: dict | None) -> None:
    """Runs that skipped their own before-RL evaluation take the shared one (in place): the
    "before" columns, and step 0 of the accuracy curve (so the largest drop counts it)."""
    if baseline is None:
        return
    for runs in results.values():
        for r in runs:
            if is_finite_number(r["before"]):
                continue
            r["before"], r["strict_before"] = baseline["before"], baseline["strict_before"]
            r["before_source"] = f"shared: measured once by {baseline['run']}"
            r["eval_curve"] = [[0, baseline["before"]], *[c for c in r["eval_curve"] if c[0] > 0]]
            r["max_accuracy_drop"] = max_drop([v for _, v in r["eval_curve"]])


def collect_finished(out_dir: str | Path) -> dict[str, list[dict]]:
    """Every finished run under ``out_dir/<algorithm>/seed<k>``, by algorithm, seeds in order."""
    out: dict[str, list[dict]] = {}
    for summary in sorted(Path(out_dir).glob("*/seed*/summary.json")):
        r = run_result(summary.parent)
        out.setdefault(r["algorithm"], []).append(r)
    for runs in out.values():
        runs.sort(key=lambda r: r["seed"])
    return out


# --------------------------------------------------------------------------- the study


def _by_seed(runs: list[dict], key: str) -> dict[int, float]:
    return {int(r["seed"]): float(r[key]) for r in runs}


def study_summary(results: dict[str, list[dict]]) -> dict[str, Any]:
    """Per-method intervals, paired differences to the baselines, stability, the verdict."""
    methods: dict[str, Any] = {}
    for algo, runs in results.items():
        stab = {
            "max_accuracy_drop": runs_max(runs, "max_accuracy_drop"),
            "skipped_steps": sum(int(r["skipped_steps"]) for r in runs),
            "kl_anchor_max": runs_max(runs, "kl_anchor_max"),
            "clipfrac_mean": runs_mean(runs, "clipfrac_mean"),
            "clipfrac_max": runs_max(runs, "clipfrac_max"),
            "importance_weight_max": runs_max(runs, "importance_weight_max"),
            "optimizer_steps_per_batch": runs_mean(runs, "optimizer_steps_per_batch"),
            "peak_rss_mb": runs_max(runs, "peak_rss_mb"),
            "wall_s": runs_mean(runs, "wall_s"),
        }
        methods[algo] = {
            "label": label(algo), "seeds": [r["seed"] for r in runs],
            **{k: t_interval([r[k] for r in runs]).to_dict() for k in ("before", "last", "best")},
            **stab,
        }
    paired: dict[str, dict[str, Any]] = {}
    diffs: dict[tuple[str, str], Interval] = {}
    for base in BASELINES:
        if base not in results:
            continue
        for algo, runs in results.items():
            if algo == base:
                continue
            for key in ("last", "best"):
                d = paired_difference(_by_seed(runs, key), _by_seed(results[base], key))
                paired.setdefault(algo, {})[f"{key}_minus_{base}"] = d.to_dict()
                if key == "last":
                    diffs[(algo, base)] = d
    claims = [c for c in VERDICT_CLAIMS if c[0] in results and c[1] in results]
    v = verdict(diffs, claims, LABELS) if claims else {
        "claims": [], "holds": False,
        "line": "Verdict: not computed (needs DAPO with GRPO and/or RPG-REINFORCE-UFKL/URKL in the runs)"}
    v["metric"] = "last held-out accuracy, paired by seed, 95% t-interval"
    return {"methods": methods, "paired": paired, "verdict": v}


def rerun_check(reruns: list[dict], results: dict[str, list[dict]], min_points: float = 0.05) -> dict[str, Any]:
    """Does a rerun of a (method, seed) reproduce its recorded last accuracy? Within
    max(``min_points``, 2 x that method's seed std of last accuracy) counts as reproduced:
    another CPU (or thread count) draws other samples, so a rerun is one more draw from the
    method's seed distribution, not a bit-identical replay."""
    rows = []
    for r in reruns:
        std = t_interval([x["last"] for x in results.get(r["algorithm"], [])]).std
        tol = max(min_points, 2 * std) if math.isfinite(std) else min_points
        diff = float(r["rerun_last"]) - float(r["recorded_last"])
        rows.append({**r, "difference": diff, "tolerance": tol, "reproduced": abs(diff) <= tol})
    return {"rule": f"|rerun - recorded| <= max({100 * min_points:g} pts, 2 x the method's seed std of last accuracy)",
            "runs": rows, "all_reproduced": all(r["reproduced"] for r in rows)}


# --------------------------------------------------------------------------- markdown


def _pct(x: float, signed: bool = False) -> str:
    return "n/a" if not is_finite_number(x) else (f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}")


def _ci(d: dict, signed: bool = False) -> str:
    """"mean [lo, hi]" in percent; just the mean for one seed."""
    if not d or d.get("n", 0) == 0:
        return "n/a"
    if d["n"] < 2:
        return f"{_pct(d['mean'], signed)} (1 seed)"
    return f"{_pct(d['mean'], signed)} [{_pct(d['lo'], signed)}, {_pct(d['hi'], signed)}]"


def _num(x: Any, fmt: str) -> str:
    return format(x, fmt) if is_finite_number(x) else "n/a"


def markdown_report(results: dict[str, list[dict]], summary: dict[str, Any]) -> list[str]:
    """The study's tables (accuracy intervals, paired differences, stability and cost) and
    the verdict line, as markdown lines."""
    methods, paired = summary["methods"], summary["paired"]
    bases = [b for b in BASELINES if b in results]
    lines = ["## Held-out accuracy: mean [95 % t-interval] over seeds (%)", "",
             "| Method | Seeds | Before RL | Last | Best |", "|---|---|---:|---:|---:|"]
    for algo, m in methods.items():
        lines.append(f"| {m['label']} | {','.join(map(str, m['seeds']))} | {_ci(m['before'])} | {_ci(m['last'])} | "
                     f"{_ci(m['best'])} |")
    if bases:
        lines += ["", "## Paired difference to the baselines (same seed): mean [95 % t-interval], points", "",
                  "| Method | " + " | ".join(f"Last − {label(b)} | Best − {label(b)}" for b in bases) + " |",
                  "|---|" + "---:|---:|" * len(bases)]
        for algo in methods:
            cells = []
            for b in bases:
                p = paired.get(algo, {})
                cells += [_ci(p.get(f"last_minus_{b}", {}), True), _ci(p.get(f"best_minus_{b}", {}), True)]
            if algo in bases and all(c == "n/a" for c in cells[2 * bases.index(algo):2 * bases.index(algo) + 2]):
                cells[2 * bases.index(algo):2 * bases.index(algo) + 2] = ["—", "—"]
            lines.append(f"| {label(algo)} | " + " | ".join(cells) + " |")
    lines += ["", "## Stability and cost (over all seeds of a method)", "",
              "| Method | Largest accuracy drop (pts) | Skipped steps | Max KL to anchor (k3) | Clip fraction mean / max "
              "(%) | Max importance weight | Optimizer steps per batch | Peak RSS (MiB) | Wall time per run (s) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for algo, m in methods.items():
        lines.append(
            f"| {m['label']} | {_pct(m['max_accuracy_drop'])} | {m['skipped_steps']} | {_num(m['kl_anchor_max'], '.3g')} | "
            f"{_pct(m['clipfrac_mean'])} / {_pct(m['clipfrac_max'])} | {_num(m['importance_weight_max'], '.3g')} | "
            f"{_num(m['optimizer_steps_per_batch'], '.1f')} | {_num(m['peak_rss_mb'], '.0f')} | "
            f"{_num(m['wall_s'], '.0f')} |")
    if summary.get("reruns"):
        rr = summary["reruns"]
        lines += ["", "## Reruns of recorded runs (reproduction check)", "", f"Rule: {rr['rule']}.", "",
                  "| Method | Seed | Recorded last (%) | Rerun last (%) | Difference (pts) | Tolerance (pts) "
                  "| Reproduced |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for r in rr["runs"]:
            lines.append(f"| {label(r['algorithm'])} | {r['seed']} | {_pct(r['recorded_last'])} | "
                         f"{_pct(r['rerun_last'])} | {_pct(r['difference'], True)} | {_pct(r['tolerance'])} | "
                         f"{'yes' if r['reproduced'] else 'NO'} |")
    lines += ["", summary["verdict"]["line"], "",
              "The verdict compares *last* held-out accuracy paired by seed: a claim \"A > B\" holds beyond seed "
              "noise when the 95 % t-interval of the per-seed difference lies above 0 (with n paired seeds the "
              "interval is mean ± t_{0.975, n-1} x std / sqrt(n): ± 2.48 x std for n = 3, ± 1.24 x std for n = 5, "
              "± 0.84 x std for n = 8)."]
    lines += _pairing_lines(summary) + _code_lines(summary) + _hypothesis_lines(summary)
    return lines


def _pairing_lines(summary: dict[str, Any]) -> list[str]:
    p = summary.get("pairing")
    if not p:
        return []
    lines = ["", "## Pairing (the same seed draws the same first batch)", "",
             f"Checked by the fingerprint of step 1's first generation round: {p['checked']} run(s)."]
    if p["broken"]:
        lines += ["", "**Broken pairs (reported only because --allow-broken-pairs was given):**", "",
                  *[f"- {b}" for b in p["broken"]]]
    else:
        lines.append("Every seed's runs drew the same first batch.")
    if p["unverified"]:
        lines.append(f"No fingerprint recorded (older runs): {', '.join(p['unverified'])}.")
    return lines


def _code_lines(summary: dict[str, Any]) -> list[str]:
    code = summary.get("code")
    if not code:
        return []
    lines = ["", "## Code (recorded by each run at its start)", ""]
    for commit, runs in code.items():
        lines.append(f"- `{commit}`: {len(runs)} run(s)")
    if len(code) > 1:
        lines.append("")
        lines.append("**The runs come from more than one code version.**")
    return lines


def _hypothesis_lines(summary: dict[str, Any]) -> list[str]:
    hyp = summary.get("hypotheses")
    if not hyp:
        return []
    lines = ["", f"## Pre-registered hypotheses (alpha {hyp['alpha']}, {hyp['correction']} correction over "
                 f"{hyp['family_size']} confirmatory tests; primary metric: {hyp['primary_metric']})", "",
             "| Id | Test | Metric | Comparison | Seeds | Estimate (pts) | Interval (pts) | p | adjusted p | "
             "permutation p | bootstrap 95 % (pts) | Outcome |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for t in hyp["tests"]:
        boot = (f"[{100 * t['bootstrap_lo']:+.1f}, {100 * t['bootstrap_hi']:+.1f}]" if "bootstrap_lo" in t else "n/a")
        ci = f"{100 * t['ci_level']:.0f} %: [{100 * t['lo']:+.1f}, {100 * t['hi']:+.1f}]" if t["n"] > 1 else "n/a"
        adj = f"{t['p_adjusted']:.3g}" if "p_adjusted" in t else "(exploratory)"
        perm = f"{t['p_permutation']:.3g}" if "p_permutation" in t else "n/a"
        lines.append(f"| {t['id']} | {t['test']}{' ±' + format(100 * t['margin'], '.1f') if t.get('margin') else ''} | "
                     f"{t['metric']} | {t['comparison']} | {t['n']} | {100 * t['mean']:+.1f} | {ci} | {t['p']:.3g} | "
                     f"{adj} | {perm} | {boot} | {t['outcome']} |")
    return lines
