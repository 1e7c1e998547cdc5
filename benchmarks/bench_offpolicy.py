"""The off-policy step before and after a change: one interleaved run, per-phase seconds and MFU.

    python benchmarks/bench_offpolicy.py --before a17fb37                      # study step, 1 thread
    python benchmarks/bench_offpolicy.py --before a17fb37 --config configs/real/smollm2-135m.yaml \
        --threads 2 --steps 3                                                   # the on-policy recipe
    python benchmarks/bench_offpolicy.py --before HEAD --after-overrides model.dtype=auto   # bf16 vs fp32

Each side is ``rpgrl train`` of the same config and seed in its own process: ``--before`` runs
the code of that git revision (checked out once into a worktree, imported through PYTHONPATH),
``--after`` this checkout (or another revision). Runs alternate B A B A ... (``--rounds``), so
slow drift of the machine hits both alike. Reported per side: the mean over rounds of the
per-step means over steps 2..N (step 1 carries warm-up) of each phase's seconds, its model FLOP
utilisation (useful FLOPs on real tokens / the fp32 or bf16 matmul peak measured at start-up,
``rpgrl.models.flops``), the response tokens per step (the two sides sample alike only to
round-off, so their batches may differ after step 1) and the peak RSS of the process; and per
round, whether step 1 drew the same first batch and how close its loss and grad norm are.

The default config is the study's (configs/real/study.yaml: SmolLM2-135M-Instruct, 8 prompts x
8, one prompt per optimizer step, 8 optimizer steps per batch), no held-out evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("generation", "logprobs", "forward_backward", "optimizer", "scoring", "other", "step")
#: rpgrl.loop.metrics.MFU_PHASES: the kept batch's tokens (generation), every sampling round's
#: (generation_sampled), each prompt once per step (forward_backward) or once per micro-batch
#: it appears in, as the shuffled mini-batches make the update run it (forward_backward_scheduled)
MFU = ("generation", "generation_sampled", "logprobs", "forward_backward", "forward_backward_scheduled")


def worktree(rev: str, where: Path) -> Path:
    """A checkout of ``rev`` (created once, reused when it already holds that commit)."""
    commit = subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", rev], text=True).strip()
    path = where / f"rpgrl-{commit[:12]}"
    if not path.exists():
        subprocess.check_call(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return path


def run_side(code: Path, config: Path, out: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    """One ``rpgrl train`` with ``code`` on PYTHONPATH; the per-step metrics and the peak RSS."""
    cmd = [sys.executable, "-m", "rpgrl", "train", str(config), f"output_dir={out}", f"seed={args.seed}",
           f"trainer.total_steps={args.steps}", "trainer.eval_every=0", f"trainer.save_every={args.steps}",
           f"trainer.num_threads={args.threads}", "trainer.profile=true", "eval.before_training=false",
           "eval.max_problems=1", "logging.progress=false", "logging.tensorboard=false", *args.overrides, *extra]
    env = {**os.environ, "PYTHONPATH": str(code)}
    t0 = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(code))
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; log {out.with_suffix('.log')}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "timing/step" in r and r["step"] > 1]
    mean = lambda k: statistics.fmean(r.get(k, 0.0) for r in steps)  # noqa: E731
    return {"seconds": {p: mean(f"timing/{p}") for p in PHASES},
            # MFU phases a side does not log (older code: *_sampled, *_scheduled) are None
            "mfu": {p: (mean(f"mfu/{p}") if all(f"mfu/{p}" in r for r in steps) else None) for p in MFU},
            "response_tokens": mean("tokens/response"), "peak_rss_mb": usage.ru_maxrss / 1024,
            "peak_gflops": mean("mfu/matmul_peak_gflops"), "wall_s": time.perf_counter() - t0,
            "first_step": first_step(rows)}


def first_step(rows: list[dict]) -> dict:
    """Step 1 of a run: its first batch's digest, loss and grad norm -- both sides start from the
    same weights and draw from the same random numbers, so these must agree to round-off."""
    r = next((r for r in rows if r.get("step") == 1), {})
    return {k: r.get(m) for k, m in (("digest", "batch/first_round_digest"), ("loss", "actor/loss"),
                                      ("grad_norm", "actor/grad_norm"))}


def table(before: list[dict], after: list[dict], names: tuple[str, str]) -> str:
    avg = lambda runs, f: statistics.fmean(f(r) for r in runs)  # noqa: E731
    lines = [f"| phase | {names[0]} s | {names[1]} s | speed-up | {names[0]} MFU | {names[1]} MFU |", "|---|---|---|---|---|---|"]
    def mfu(runs: list[dict], p: str) -> str:
        vals = [r["mfu"].get(p) for r in runs]
        return "n/a" if any(v is None for v in vals) else f"{100 * statistics.fmean(vals):.1f} %"

    for p in PHASES:
        b, a = avg(before, lambda r: r["seconds"][p]), avg(after, lambda r: r["seconds"][p])
        cells = f" {mfu(before, p)} | {mfu(after, p)} |" if p in MFU else " | |"
        lines.append(f"| {p} | {b:.2f} | {a:.2f} | {b / a if a else float('nan'):.2f}x |{cells}")
    for p in MFU:
        if p not in PHASES:
            lines.append(f"| MFU {p} | | | | {mfu(before, p)} | {mfu(after, p)} |")
    for key, label in (("response_tokens", "response tokens / step"), ("peak_rss_mb", "peak RSS (MiB)"),
                       ("peak_gflops", "matmul peak (GFLOP/s)")):
        lines.append(f"| {label} | {avg(before, lambda r: r[key]):.0f} | {avg(after, lambda r: r[key]):.0f} | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="git revision of the 'before' side")
    p.add_argument("--after", default=None, help="git revision of the 'after' side (default: this checkout)")
    p.add_argument("--config", default="configs/real/study.yaml")
    p.add_argument("--steps", type=int, default=3, help="RL steps per run (step 1 is left out)")
    p.add_argument("--rounds", type=int, default=2, help="runs per side, interleaved B A B A")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--before-overrides", nargs="*", default=[])
    p.add_argument("--after-overrides", nargs="*", default=[])
    p.add_argument("--work", default="/tmp/bench_offpolicy")
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*", help="dotted overrides for both sides")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    config = (ROOT / args.config).resolve()
    sides = {"before": (worktree(args.before, work), args.before_overrides),
             "after": (worktree(args.after, work) if args.after else ROOT, args.after_overrides)}
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for i in range(args.rounds):
        for side, (code, extra) in sides.items():
            out = work / f"{side}-{i}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            r = run_side(code, config, out, args, extra)
            runs[side].append(r)
            print(f"round {i + 1} {side}: step {r['seconds']['step']:.2f} s, "
                  f"fwd/bwd MFU {100 * (r['mfu']['forward_backward'] or 0):.1f} %, peak RSS {r['peak_rss_mb']:.0f} MiB",
                  flush=True)
    for i, (b, a) in enumerate(zip(runs["before"], runs["after"]), 1):
        fb, fa = b["first_step"], a["first_step"]
        same = "same" if fb["digest"] == fa["digest"] else "DIFFERENT"
        print(f"round {i} step 1: {same} first batch; loss {fb['loss']:.8f} vs {fa['loss']:.8f}, "
              f"grad norm {fb['grad_norm']:.7f} vs {fa['grad_norm']:.7f}")
    names = (f"before ({args.before})", f"after ({args.after or 'this checkout'})")
    print(table(runs["before"], runs["after"], names))
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv[1:], "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
