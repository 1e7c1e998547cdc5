"""Where the off-policy update goes, per op (torch.profiler), on one real batch.

    python benchmarks/profile_update.py                                   # this checkout
    python benchmarks/profile_update.py --code <worktree of a rev>        # another revision

The trainer of ``--config`` (the study's: SmolLM2-135M-Instruct, 8 prompts x 8, one prompt's
sequences per optimizer step) collects and prepares its first batch, then runs ``Trainer.update``
on it (8 forward/backward micro-steps and 8 optimizer steps) ``--repeats`` times from the same
weights and optimizer state, timed, and once more under the profiler. Printed: seconds per phase
of each timed update, its loss and grad norm (the same batch and weights give the same numbers on
the same code), the aten ops by self CPU time, and the costliest ops by input shape among
those that move memory rather than multiply (copies, fills, elementwise). Seconds mean something
on a quiet machine only; the shares anywhere.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MEMORY_OPS = ("aten::copy_", "aten::fill_", "aten::mul", "aten::mul_", "aten::add", "aten::add_",
              "aten::linalg_vector_norm", "aten::cat", "aten::zero_")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/real/study.yaml"))
    p.add_argument("--code", default=str(ROOT), help="the rpgrl checkout to import (default: this one)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rows", type=int, default=25, help="ops in each table")
    args = p.parse_args(argv)
    sys.path.insert(0, args.code)
    from rpgrl.config import load_config
    from rpgrl.loop.metrics import StepTimer
    from rpgrl.loop.optim import eval_mode
    from rpgrl.loop.trainer import Trainer
    from torch.profiler import ProfilerActivity, profile

    out = tempfile.mkdtemp(prefix="profile_update_")
    cfg = load_config(args.config, [f"output_dir={out}", f"trainer.num_threads={args.threads}", "trainer.device=cpu",
                                    "eval.before_training=false", "trainer.eval_every=0", "logging.tensorboard=false"])
    trainer = Trainer(cfg, log=lambda *a: print(*a, file=sys.stderr))
    trainer.timer = StepTimer()
    with eval_mode(trainer.optimizer):
        batch, _ = trainer.collect()
        trainer.prepare(batch)
    r = batch.rollout
    print(f"batch: {tuple(r.input_ids.shape)} (sequences x columns), {int(r.response_mask.sum())} response tokens")
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    opt_state = copy.deepcopy(trainer.optimizer.state_dict())

    def fresh() -> None:
        trainer.model.load_state_dict(weights)
        trainer.optimizer.load_state_dict(opt_state)
        trainer.timer = StepTimer()

    for i in range(args.repeats):
        fresh()
        t0 = time.perf_counter()
        m = trainer.update(batch)
        sec = time.perf_counter() - t0
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in trainer.timer.seconds.items())
        print(f"update {i + 1}: {sec:.2f} s ({phases}); loss {m['actor/loss']:.8f}, grad norm {m['actor/grad_norm']:.7f}")
    fresh()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        trainer.update(batch)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    by_shape = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in MEMORY_OPS]
    by_shape.sort(key=lambda e: -e.self_cpu_time_total)
    print("| op | self CPU ms | calls | input shapes |\n|---|---:|---:|---|")
    for e in by_shape[:args.rows]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e3:.1f} | {e.count} | {str(e.input_shapes)[:100]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
