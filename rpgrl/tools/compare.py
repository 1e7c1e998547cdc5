"""``rpgrl compare`` and ``rpgrl plot``: several algorithms x seeds, side by side.

``compare`` trains every (algorithm, seed) pair one after another through the same
``Trainer`` as ``rpgrl train`` (only ``algorithm.preset``, ``seed`` and ``output_dir`` differ),
then writes the paper's table layout (docs/math.md §8: held-out accuracy "last" and "best",
mean ± std over seeds) to ``comparison.md``, the seed statistics of
``rpgrl.tools.compare_report`` (95 % t-intervals, paired differences to DAPO and GRPO,
stability, cost, a verdict line) below it, the per-run numbers to ``study.json`` (and
``--json PATH``), and the training curves of docs/math.md §7 (one line per algorithm, a
band over seeds) to ``comparison.png``.

A study is run in chunks: ``--algorithms a,b --seeds 0,1`` trains a subset, ``--resume``
reuses finished runs (summary.json) and continues unfinished ones from their latest
checkpoint, and every report covers *all* finished runs under ``--out`` -- after checking
that they were made with the same config and overrides, so chunks cannot silently mix
settings. ``--isolate`` trains each run in its own process: its peak RSS is its own
(``os.wait4``), and a crash ends one run, not the study.

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
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from rpgrl.tools.compare_report import (RUN_INFO, algorithm_of, code_versions, collect_finished, curve_records,
                                        fill_shared_before, markdown_report, pairing_problems, rerun_check, run_info,
                                        run_result, shared_baseline, study_summary)
from rpgrl.loop.tracking import is_finite_number
from rpgrl.tools.arms import Arm, parse_seeds

__all__ = ["Arm", "add_subcommands", "algorithm_arms", "compare", "config_differences", "format_table", "main",
           "parse_algorithms", "parse_seeds", "plot_runs", "run_result"]

#: keys that differ between the methods of one study by design
PER_METHOD_KEYS = ("algorithm.preset", "algorithm.loss", "algorithm.advantage")
#: keys that differ between the runs of one method, or that do not change what is computed
#: (so chunks of a study may be run with different values)
PER_RUN_KEYS = ("seed", "output_dir", "eval.before_training", "logging.run_name", "logging.progress", "logging.tensorboard",
                "logging.wandb", "logging.wandb_project", "trainer.num_threads", "trainer.profile",
                "warmstart.cache_dir")


# --------------------------------------------------------------------------- arguments


def parse_algorithms(items: list[str]) -> list[str]:
    """``["grpo,dapo", "rpg_ufkl"]`` -> ``["grpo", "dapo", "rpg_ufkl"]``."""
    return [a.strip() for item in items for a in item.split(",") if a.strip()]


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(a: dict, b: dict, ignore: tuple[str, ...] = PER_RUN_KEYS) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (a's value, b's value)}`` of two config dicts (``rpgrl.config.to_dict``
    or a run's config.yaml), leaving out ``ignore``."""
    fa, fb = _flat(a), _flat(b)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb))
            if k not in ignore and fa.get(k) != fb.get(k)}


# --------------------------------------------------------------------------- one run's numbers


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
            return [r.get(k, math.nan) for r in runs]  # a run from an older study.json may lack k

        steps = sorted({r["steps"] for r in runs})
        lines.append(
            f"| {algo} | {len(runs)} | {'/'.join(map(str, steps))} | {_pm(col('before'))} | "
            f"{_pm(col('last'))} | {_pm(col('best'))} | {_pm(col('wall_seconds'), 1.0, 0)} |"
        )
    return "\n".join(lines)


def _markdown(results: dict[str, list[dict]], header: list[str], summary: dict[str, Any] | None = None) -> str:
    return "\n".join([
        "# Algorithm comparison", "",
        *header, "",
        format_table(results), "",
        "Held-out accuracy of greedy decoding on the held-out split. *Last*: after the final "
        "step; *Best*: maximum over the run's evaluations after step 0 (trainer.eval_every); "
        "mean ± sample std over seeds. Curves: comparison.png (band = min-max over seeds).", "",
        *(markdown_report(results, summary) + [""] if summary is not None else []),
        "Runs:", "",
        *[f"- {a} seed {r.get('seed', i)}: `{r['run_dir']}`" for a, runs in results.items() for i, r in enumerate(runs)],
        "",
    ])


# --------------------------------------------------------------------------- compare / plot


def _select(algo: str) -> str:
    """A preset, or a loss name (built-in, entry point, module:function) run with the default
    preset's hyper-parameters and the shared overrides."""
    from rpgrl.config import PRESETS
    from rpgrl.losses import LOSSES

    return f"algorithm.preset={algo}" if algo in PRESETS or algo not in LOSSES else f"algorithm.loss={algo}"


def algorithm_arms(algorithms: list[str], seeds: int | list[int] | str) -> list[Arm]:
    """``--algorithms`` x ``--seeds``: one arm per preset (or loss name), every arm all seeds."""
    seed_list = tuple(parse_seeds(seeds))
    return [Arm(a, (_select(a),), seed_list) for a in algorithms]


def _run_items(config_path: str | None, overrides: list[str], arm: Arm, seed: int, run_dir: Path) -> list[str]:
    return [*([config_path] if config_path else []), *overrides, *arm.items, f"seed={seed}", f"output_dir={run_dir}"]


def _shown(diff: dict[str, tuple[Any, Any]]) -> str:
    """The first keys of a ``config_differences`` result, as "key: a there, b here"."""
    return "; ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in list(diff.items())[:8])


def _check_same_setting(run_dir: Path, expected: dict) -> None:
    """A finished run merged into the report must have been made with this config."""
    from rpgrl.config import ConfigError

    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    diff = config_differences(yaml.safe_load(path.read_text()) or {}, expected)
    if diff:
        raise ConfigError(f"compare: {run_dir} was made with another setting ({_shown(diff)}); give the same "
                          "config and overrides as for the other chunks, or another --out")


def _prepare_unfinished(run_dir: Path, log: Callable) -> bool:
    """An unfinished run dir: True if it holds a checkpoint to continue from; else its partial
    metrics are removed (nothing of it can be continued, and appending would duplicate steps)."""
    from rpgrl.loop.checkpoint import find_latest_checkpoint

    if not run_dir.exists():
        return False
    if find_latest_checkpoint(run_dir) is not None:
        return True
    for name in ("metrics.jsonl", "tensorboard"):
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    if (run_dir / "metrics.jsonl.tmp").exists():
        (run_dir / "metrics.jsonl.tmp").unlink()
    log(f"[compare] {run_dir}: unfinished and without a checkpoint; starting it again")
    return False


def _write_info(run_dir: Path, info: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (RUN_INFO + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, run_dir / RUN_INFO)


def _train_one(cfg, items: list[str], run_dir: Path, *, resume: bool, isolate: bool, log: Callable) -> dict:
    """Train one run, in this process or (``isolate``) in a child; returns what was measured."""
    from rpgrl.loop.trainer import Trainer, TrainingError

    t0 = time.perf_counter()
    if not isolate:
        Trainer(cfg, resume=resume, log=log).train()
        return {"process_wall_s": time.perf_counter() - t0}
    argv = [sys.executable, "-m", "rpgrl.cli", "train", *items, *(["--resume"] if resume else [])]
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[1])  # the child runs this very rpgrl
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "a", encoding="utf-8") as logfile:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            logfile.write(line)
            logfile.flush()
            log(line.rstrip("\n"))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise TrainingError(f"{run_dir}: `rpgrl train` exited with {proc.returncode}; see {run_dir / 'train.log'}")
    # Linux ru_maxrss is in KiB: the child's own peak (the scorer's forked worker not included)
    return {"process_wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def compare(
    algorithms: list[str], seeds: int | list[int] | str, config_path: str | None, overrides: list[str],
    out_dir: str | Path, *, resume: bool = False, band: str = "minmax", log: Callable = print,
    isolate: bool = False, report_only: bool = False, json_path: str | Path | None = None,
    prune_checkpoints: bool = False, command: str | None = None, shared_before: bool = False,
    earlier_json: str | Path | None = None, arms: list[Arm] | None = None, plan: Any = None,
    allow_broken_pairs: bool = False, part: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Train each algorithm x seed sequentially, then write the report of every finished run under ``out_dir``.

    ``seeds``: a count N (seeds 0..N-1) or a list of seeds. ``arms``: instead of ``algorithms`` x
    ``seeds``, named settings with their own overrides and seeds (a study plan,
    ``rpgrl.tools.study_plan``; ``plan`` then adds its hypotheses to the report). Every config is
    built and validated before the first run starts, so a typo fails in seconds rather than after
    hours. A run dir that already holds metrics would be appended to, so it is refused
    unless ``resume``: then finished runs (summary.json) are reused and unfinished ones
    continue from their latest checkpoint (or start again if they have none).
    ``report_only``: train nothing, report what has finished.
    ``shared_before``: only the first run evaluates before RL; the others skip it and report
    that number (``compare_report.shared_baseline`` says why that is the same measurement).
    ``earlier_json``: a study.json written earlier with the same setting; its runs that have no
    finished folder under ``out_dir`` (run elsewhere, or their folders lost) are reported from
    the numbers recorded there (``carry_earlier``).
    Runs with the same seed must have drawn the same first batch (``compare_report.pairing_problems``);
    a report with a broken pair is refused, naming the runs, unless ``allow_broken_pairs``.
    ``part=(k, n)``: train only every n-th run starting at the k-th (1-based) and report nothing,
    so that n processes share a study (two side by side on 2 cores) and nobody reads a partial
    table; ``report_only`` afterwards writes the report.

    Returns ``{"results": {algo: [run_result per seed]}, "summary": study_summary, "markdown":
    path, "png": path, "json": path}``.
    """
    from rpgrl.config import ConfigError, load_config, to_dict

    if arms is None:
        if not algorithms:
            raise ConfigError("compare: give at least one algorithm (--algorithms grpo rpg_reinforce_ufkl ...)")
        if len(set(algorithms)) != len(algorithms):
            raise ConfigError(f"compare: --algorithms lists a name twice: {algorithms}")
        arms = algorithm_arms(algorithms, seeds)
    out = Path(out_dir)
    todo = []
    for arm in arms:
        for seed in arm.seeds:
            run_dir = out / arm.folder / f"seed{seed}"
            items = _run_items(config_path, overrides, arm, seed, run_dir)
            cfg = load_config(config_path, items[1:] if config_path else items)
            if not (resume or report_only) and (run_dir / "metrics.jsonl").exists():
                raise ConfigError(f"compare: {run_dir} already holds a run; pass --resume to reuse/continue "
                                  "it, or choose another --out")
            if (resume or report_only) and (run_dir / "summary.json").is_file():
                _check_same_setting(run_dir, to_dict(cfg))
            todo.append((arm, seed, cfg, items))
    for i, (arm, seed, cfg, items) in enumerate(todo, 1):
        if part is not None and (i - 1) % part[1] != part[0] - 1:
            continue
        run_dir = Path(cfg.output_dir)
        finished = (run_dir / "summary.json").is_file()
        if report_only or (resume and finished):
            if finished:
                log(f"[compare {i}/{len(todo)}] {arm.name} seed {seed}: finished earlier, reusing {run_dir}")
            else:
                log(f"[compare {i}/{len(todo)}] {arm.name} seed {seed}: not finished, left out of the report")
        else:
            cont = _prepare_unfinished(run_dir, log) if resume else False
            log(f"[compare {i}/{len(todo)}] {arm.name} seed {seed} -> {run_dir}" + (" (continuing)" if cont else ""))
            info = run_info(run_dir) if cont else {}
            if shared_before and shared_baseline(collect_finished(out)) is not None:
                items = [*items, "eval.before_training=false"]
                cfg = load_config(config_path, items[1:] if config_path else items)
            run_command = "rpgrl train " + shlex.join(items)
            base = {"algorithm": arm.name, "arm_items": list(arm.items), "seed": seed, "config": config_path,
                    "overrides": overrides, "run_command": run_command}
            _write_info(run_dir, {**base, **{k: info[k] for k in ("attempts",) if k in info}})
            measured = _train_one(cfg, items, run_dir, resume=cont, isolate=isolate, log=log)
            attempts = [*info.get("attempts", []), measured]
            rss = [a["peak_rss_mb"] for a in attempts if "peak_rss_mb" in a]
            _write_info(run_dir, {
                **base, "attempts": attempts,
                "process_wall_s": sum(a["process_wall_s"] for a in attempts),
                **({"peak_rss_mb": max(rss), "peak_rss_source": "os.wait4 ru_maxrss of the run's own process"}
                   if rss else {}),
            })
        if prune_checkpoints and (run_dir / "summary.json").is_file() and (run_dir / "checkpoints").is_dir():
            shutil.rmtree(run_dir / "checkpoints")
    if part is not None:
        log(f"compare: part {part[0]}/{part[1]} done; when every part has finished, write the report "
            "with the same command, --report-only instead of --part")
        return {"results": None, "summary": None}
    results = _merge_finished(out, arms, config_path, overrides, log)
    reruns = carry_earlier(results, earlier_json, config_path, overrides, log) if earlier_json is not None else []
    if not results:
        raise ConfigError(f"compare: no finished run under {out} to report")
    broken, unverified = pairing_problems(results)
    if broken and not allow_broken_pairs:
        raise ConfigError("compare: runs with the same seed must start identically, but " + "; ".join(broken)
                          + ". Find out why (docs/benchmarks.md, section 4), rerun the odd run, or pass "
                          "--allow-broken-pairs to report anyway (the report then says so)")
    fill_shared_before(results, shared_baseline(results))
    summary = study_summary(results)
    summary["pairing"] = {"broken": broken, "unverified": unverified,
                          "checked": sum(len(r) for r in results.values()) - len(unverified)}
    summary["code"] = code_versions(results)
    if plan is not None:
        from rpgrl.tools.hypotheses import evaluate_plan

        summary["hypotheses"] = evaluate_plan(plan, results)
    if reruns:
        summary["reruns"] = rerun_check(reruns, results)
    seeds_text = "; ".join(f"{a.name} {','.join(map(str, a.seeds))}" for a in arms) if plan is not None else \
        ",".join(map(str, arms[0].seeds)) if arms else ""
    header = [f"Config: `{config_path or '(CPU default)'}`; overrides: "
              f"`{' '.join(overrides) or '(none)'}`; seeds {seeds_text} requested; "
              f"this report covers every finished run under `{out}`."]
    md = out / "comparison.md"
    md.write_text(_markdown(results, header, summary))
    (out / "comparison.json").write_text(json.dumps(results, indent=2))
    study = study_json(results, summary, command=command, config_path=config_path, overrides=overrides)
    if plan is not None:
        study["plan"] = plan.to_dict()
    paths = [out / "study.json", *([Path(json_path)] if json_path else [])]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(_finite(study), indent=2, default=_json_default) + "\n")
    png = _plot(results, out / "comparison.png", band)
    log(format_table(results))
    log(summary["verdict"]["line"])
    for h in summary.get("hypotheses", {}).get("tests", []):
        log(h["line"])
    log(f"comparison: {md}; curves: {png}; per-run numbers: {', '.join(map(str, paths))}")
    return {"results": results, "summary": summary, "markdown": str(md), "png": str(png), "json": str(paths[-1])}


def _merge_finished(out: Path, arms: list[Arm], config_path: str | None, overrides: list[str],
                    log: Callable) -> dict[str, list[dict]]:
    """Every finished run under ``out``: this call's arms first (in the order given), then
    the others by name; each checked to have been made with this config and these overrides
    (a run of an arm not given here: with its own recorded arm items, else its name as a preset)."""
    from rpgrl.config import ConfigError, load_config, to_dict

    found = collect_finished(out)
    by_name = {a.name: a for a in arms}
    order = [a.name for a in arms if a.name in found] + sorted(a for a in found if a not in by_name)
    results: dict[str, list[dict]] = {}
    for algo in order:
        for r in found[algo]:
            run_dir = Path(r["run_dir"])
            recorded = run_info(run_dir).get("arm_items")
            arm = by_name.get(algo) or Arm(algo, tuple(recorded) if recorded else (_select(algo),), ())
            try:
                expected = load_config(config_path, _run_items(config_path, overrides, arm, r["seed"], run_dir)[
                    1 if config_path else 0:])
            except ConfigError as exc:
                raise ConfigError(f"compare: cannot rebuild the config of {run_dir} to check it: {exc}") from None
            _check_same_setting(run_dir, to_dict(expected))
            results.setdefault(algo, []).append({**r, "algorithm": algo})
    return results


_NOT_NUMBERS = ("eval_curve", "curves", "run_dir", "run_command", "recorded_in", "before_source", "peak_rss_source",
                "first_batch_digest", "code", "machine")


def carry_earlier(results: dict[str, list[dict]], path: str | Path, config_path: str | None,
                  overrides: list[str], log: Callable = print) -> list[dict]:
    """Add (in place) the runs recorded in an earlier study.json at ``path`` whose (algorithm,
    seed) has no finished folder here; each is marked ``recorded_in``. The JSON must have been
    made with the same setting (its config and overrides, per-run keys aside), else ConfigError.
    A run kept this way is what the JSON says of it: its numbers, accuracy curve and (JSON
    written since "curves" was added) per-step curves. Returns the reruns: each recorded run
    that a finished folder here replaced, with both last accuracies (``rerun_check`` judges them);
    a record of the folder's own run (same wall time and last accuracy) is not a rerun."""
    from rpgrl.config import ConfigError, load_config, to_dict

    path = Path(path)
    try:
        earlier = json.loads(path.read_text())
        runs = earlier["runs"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"compare: --earlier-json {path}: expected a study.json written by rpgrl compare "
                          f"(an object with a 'runs' list): {exc}") from None
    try:
        theirs = to_dict(load_config(earlier.get("config"), list(earlier.get("overrides") or [])))
    except ConfigError as exc:
        raise ConfigError(f"compare: --earlier-json {path}: cannot rebuild its setting: {exc}") from None
    diff = config_differences(theirs, to_dict(load_config(config_path, overrides)),
                              ignore=(*PER_RUN_KEYS, "algorithm.preset"))
    if diff:
        raise ConfigError(f"compare: --earlier-json {path} was made with another setting ({_shown(diff)})")
    added, reruns = 0, []
    for i, r in enumerate(runs):
        if not isinstance(r, dict) or not {"algorithm", "seed", "last"} <= set(r):
            raise ConfigError(f"compare: --earlier-json {path}: runs[{i}] lacks algorithm, seed or last")
        have = results.setdefault(r["algorithm"], [])
        here = next((h for h in have if int(h["seed"]) == int(r["seed"])), None)
        if here is not None:
            log(f"[compare] {r['algorithm']} seed {r['seed']}: a finished folder here replaces the record in {path}")
            if (r.get("wall_s"), r["last"]) != (here["wall_s"], here["last"]):  # else: this very run, recorded
                reruns.append({"algorithm": r["algorithm"], "seed": int(r["seed"]), "recorded_last": r["last"],
                               "rerun_last": here["last"], "recorded_in": str(path), "rerun_dir": here["run_dir"]})
            continue
        # the JSON writes nan as null; curves and texts stay None (a record older than "curves" has none)
        nan = {k: math.nan for k, v in r.items() if v is None and k not in _NOT_NUMBERS}
        have.append({**r, **nan, "seed": int(r["seed"]), "recorded_in": str(path)})
        added += 1
    for runs_ in results.values():
        runs_.sort(key=lambda x: int(x["seed"]))
    log(f"[compare] {added} run(s) reported from their record in {path}")
    return reruns


def _json_default(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else str(x)


def _finite(x: Any) -> Any:
    """JSON-safe: nan/inf -> None, recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _task(config_path: str | None, overrides: list[str]) -> tuple[str | None, dict]:
    from rpgrl.config import load_config

    cfg = load_config(config_path, overrides)
    d = cfg.data
    task: dict[str, Any] = {"name": d.task if not d.train_files else "files", "train_files": d.train_files,
                            "val_files": d.val_files}
    if not d.train_files:
        from rpgrl.data.procedural import addition_splits

        train, test = addition_splits(d.operand_min, d.operand_max, test_size=d.test_size, task=d.task)
        task.update({"operand_min": d.operand_min, "operand_max": d.operand_max, "test_size": d.test_size,
                     "n_train": len(train), "n_heldout": len({e.uid for e in test}),
                     "disjoint": not ({(e.uid.rsplit("/", 1)[1]) for e in train}
                                      & {e.uid.rsplit("/", 1)[1] for e in test})})
    task.update({"eval_temperature": cfg.eval.temperature, "eval_max_new_tokens":
                 cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens})
    return cfg.model.path, task


_RUN_FIELDS = ("algorithm", "seed", "before", "before_source", "last", "best", "strict_before", "strict_last", "steps",
               "optimizer_steps_per_batch", "optimizer_steps_per_batch_min", "n_heldout", "max_accuracy_drop",
               "skipped_steps", "kl_anchor_max", "importance_weight_max", "clipfrac_mean", "clipfrac_max",
               "gen_batches_mean", "kept_groups_mean", "step_seconds_mean", "peak_rss_mb", "peak_rss_source",
               "wall_s", "wall_seconds", "process_wall_s", "eval_curve", "curves", "run_dir", "run_command",
               "machine", "code", "first_batch_digest", "recorded_in")


def study_json(results: dict[str, list[dict]], summary: dict[str, Any], *, command: str | None,
               config_path: str | None, overrides: list[str]) -> dict[str, Any]:
    """``{"command", "model", "task", "runs": [...], "methods", "paired", "verdict"}``."""
    model, task = _task(config_path, overrides)
    runs = [{k: r.get(k) for k in _RUN_FIELDS} for rs in results.values() for r in rs]
    return _finite({"command": command, "config": config_path, "overrides": overrides, "model": model,
                    "task": task, "runs": runs, **summary})


def _plot(results: dict[str, list[dict]], out_png: Path, band: str) -> Path:
    from rpgrl.loop import metrics as M
    from rpgrl.loop.tracking import read_metrics
    from rpgrl.tools.plots import plot_comparison

    def records(r: dict) -> list[dict]:
        run_dir = Path(str(r.get("run_dir")))
        if not (run_dir / "metrics.jsonl").is_file():
            return curve_records(r)
        recs = read_metrics(run_dir)
        # a run that took the shared before-RL evaluation (fill_shared_before) logged no step 0 of
        # its own: its curve starts from the shared one, as its eval_curve does
        if r.get("before_source", "own") != "own":
            recs += [{M.STEP: 0, M.EVAL_ACCURACY: v} for s, v in r.get("eval_curve") or [] if s == 0]
        return recs

    runs = {algo: [records(r) for r in rs] for algo, rs in results.items()}
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


def parse_part(text: str | None) -> tuple[int, int] | None:
    """``"K/N"`` -> (K, N) with 1 <= K <= N, or None."""
    from rpgrl.config import ConfigError

    if text is None:
        return None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"compare: --part {text!r}: expected K/N, e.g. 1/2") from None
    if not 1 <= k <= n:
        raise ConfigError(f"compare: --part {text!r}: K must be in 1..N")
    return k, n


def _compare_cmd(args: argparse.Namespace) -> int:
    from rpgrl.config import ConfigError, split_config_args
    from rpgrl.loop.trainer import TrainingError

    # "--algorithms A B cfg.yaml k=v": nargs="+" swallows what follows; give it back to items.
    given = args.algorithms or []
    moved = [a for a in given if "=" in a or a.endswith((".yaml", ".yml"))]
    algorithms = parse_algorithms([a for a in given if a not in moved])
    try:
        if bool(args.plan) == bool(algorithms):
            raise ConfigError("compare: give either --algorithms (with --seeds) or --plan PLAN.yaml")
        config_path, overrides = split_config_args(moved + args.items)
        plan = arms = None
        if args.plan:
            from rpgrl.tools.study_plan import load_plan

            plan = load_plan(args.plan)
            if config_path and plan.config and config_path != plan.config:
                raise ConfigError(f"compare: the plan's config is {plan.config}; do not give another ({config_path})")
            config_path, overrides, arms = config_path or plan.config, [*plan.overrides, *overrides], plan.arm_list()
        which = ["--plan", str(args.plan)] if args.plan else ["--algorithms", ",".join(algorithms), "--seeds",
                                                               str(args.seeds)]
        command = shlex.join(["rpgrl", "compare", *which,
                              *([config_path] if config_path and not args.plan else []),
                              *(overrides if not args.plan else overrides[len(plan.overrides):]),
                              "--out", str(args.out),
                              *(["--resume"] if args.resume else []), *(["--isolate"] if args.isolate else []),
                              *(["--prune-checkpoints"] if args.prune_checkpoints else []),
                              *(["--shared-before"] if args.shared_before else []),
                              *(["--report-only"] if args.report_only else []),
                              *(["--allow-broken-pairs"] if args.allow_broken_pairs else []),
                              *(["--earlier-json", str(args.earlier_json)] if args.earlier_json else []),
                              *(["--json", str(args.json)] if args.json else [])])
        compare(algorithms, args.seeds, config_path, overrides, args.out, resume=args.resume,
                band=args.band, isolate=args.isolate, report_only=args.report_only, json_path=args.json,
                prune_checkpoints=args.prune_checkpoints, command=command, shared_before=args.shared_before,
                earlier_json=args.earlier_json, arms=arms, plan=plan, allow_broken_pairs=args.allow_broken_pairs,
                part=parse_part(args.part))
    except (ConfigError, ValueError, ImportError) as exc:
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


class _IntermixedParser(argparse.ArgumentParser):
    """``rpgrl compare``'s parser: CONFIG.yaml and key=value items may come before, between
    or after the options (``cfg.yaml --seeds 0, k=v``); plain argparse stops taking
    positionals after their first run and rejects the rest."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:  # parse_known_intermixed_args calls back into this method
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def add_subcommands(subparsers) -> None:
    """Register ``compare`` and ``plot`` on an ``add_subparsers()`` object (rpgrl.cli)."""
    c = subparsers.add_parser("compare", help="train several algorithms x seeds; table + comparison.png")
    c.__class__ = _IntermixedParser  # same parser, intermixed positionals (a subclass adds no state)
    c.add_argument("--algorithms", nargs="+", metavar="NAME",
                   help="algorithm presets (algorithm.preset), e.g. grpo dapo rpg_reinforce_ufkl (or grpo,dapo,...), "
                        "or loss names (algorithm.loss: an rpgrl.losses entry point or module:function)")
    c.add_argument("--seeds", default="3",
                   help="a count N (seeds 0..N-1, default 3), a list 0,1,2 (one seed k: 'k,') or a range 2-4")
    c.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value",
                   help="an optional YAML config, then dotted overrides shared by every run")
    c.add_argument("--out", default="runs/compare", help="runs go to OUT/<algorithm>/seed<k>")
    c.add_argument("--resume", action="store_true",
                   help="reuse finished runs under --out and continue unfinished ones from checkpoints")
    c.add_argument("--isolate", action="store_true",
                   help="train each run in its own process (its own peak RSS; a crash ends one run)")
    c.add_argument("--report-only", action="store_true",
                   help="train nothing: report every finished run under --out (same config and overrides)")
    c.add_argument("--json", default=None, metavar="PATH", help="also write the per-run numbers (study.json) here")
    c.add_argument("--prune-checkpoints", action="store_true",
                   help="delete a run's checkpoints/ once it has finished (its final/ model stays)")
    c.add_argument("--shared-before", action="store_true",
                   help="evaluate before RL once (the first run) and report it for every run: the same "
                        "initial weights and held-out set give the same greedy replies")
    c.add_argument("--earlier-json", default=None, metavar="PATH",
                   help="a study.json made earlier with the same setting: its runs without a finished folder "
                        "under --out are reported from the numbers recorded there")
    c.add_argument("--part", default=None, metavar="K/N",
                   help="train only runs K, K+N, K+2N, ... of the study and write no report: N processes "
                        "share one study (e.g. two side by side: --part 1/2 and --part 2/2); then "
                        "--report-only writes the report")
    c.add_argument("--plan", default=None, metavar="PLAN.yaml",
                   help="a pre-registered study plan (rpgrl.tools.study_plan): its arms x seeds instead of "
                        "--algorithms/--seeds, and its hypotheses' declared tests in the report")
    c.add_argument("--allow-broken-pairs", action="store_true",
                   help="report even when runs with the same seed drew different first batches (the report says so)")
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
