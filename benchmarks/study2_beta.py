"""H4's beta* for round 2 of the real-model study, by the pre-registered rule
(docs/study2-preregistration.md, "H4"): the smallest beta of the grid whose KL share of the
update (``actor/kl_share`` = sum|C_KL| / sum|w A| over tokens) averages >= 0.25 over RL steps
2-4 of RPG-REINFORCE-UFKL against a fixed reference, seed 100 (no study arm uses it); the
largest of the grid if none does. Only training steps run -- no held-out evaluation -- so no
accuracy is seen before the choice.

    python benchmarks/study2_beta.py --json docs/results/real-study-2-beta.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from rpgrl.config import load_config
from rpgrl.loop import metrics as M
from rpgrl.loop.run_state import code_version
from rpgrl.loop.trainer import Trainer

GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
THRESHOLD = 0.25


def shares(beta: float, *, steps: int, seed: int, threads: int) -> list[float]:
    """actor/kl_share of each RL step of one calibration run (training only)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config("configs/real/study2.yaml", [
            "algorithm.preset=rpg_reinforce_ufkl", "algorithm.anchor.mode=fixed", f"algorithm.beta={beta}",
            f"seed={seed}", f"trainer.num_threads={threads}", "trainer.profile=false", f"output_dir={out}"])
        trainer = Trainer(cfg, log=lambda *_: None)
        return [float(trainer.step().get(M.KL_SHARE, float("nan"))) for _ in range(steps)]


def choose(per_beta: dict[float, float], threshold: float = THRESHOLD) -> float:
    """The rule: the smallest beta reaching the threshold, else the largest beta tried."""
    ok = [b for b, s in sorted(per_beta.items()) if s >= threshold]
    return ok[0] if ok else max(per_beta)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows, mean_share = [], {}
    for beta in GRID:
        t0 = time.perf_counter()
        s = shares(beta, steps=args.steps, seed=args.seed, threads=args.threads)
        mean_share[beta] = statistics.fmean(s[1:])
        rows.append({"beta": beta, "kl_share_per_step": s, "mean_steps_2_on": mean_share[beta],
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"beta {beta:g}: kl_share per step {[round(x, 4) for x in s]}, mean over steps 2-{args.steps} "
              f"{mean_share[beta]:.4f} ({rows[-1]['seconds']} s)", flush=True)
    star = choose(mean_share)
    print(f"beta* = {star:g} (smallest beta with mean share >= {THRESHOLD}, else the largest)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rule": __doc__.split("\n\n")[0], "threshold": THRESHOLD, "seed": args.seed,
                       "steps": args.steps, "code": code_version(), "runs": rows, "beta_star": star}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
