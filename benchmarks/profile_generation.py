"""Where one sampling round of the study's step goes, per op (torch.profiler).

    python benchmarks/profile_generation.py                       # this checkout
    PYTHONPATH=<worktree of a rev> python benchmarks/profile_generation.py --code <worktree>

One round = the first 8 training prompts of ``--config`` (the study's: SmolLM2-135M-Instruct,
arith_chat through its chat template) x n samples, ``rollout.max_new_tokens`` tokens at most, the
trainer's sampler (``rpgrl.loop.generation.generate``; pi_old's scores with it where the code
has them). One warm-up round, ``--rounds`` timed rounds, then ``--rounds`` profiled rounds; the
table is aten ops by self CPU time. Relative shares mean something on a busy machine; seconds
only on a quiet one.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/real/study.yaml"))
    p.add_argument("--code", default=str(ROOT), help="the rpgrl checkout to import (default: this one)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=30, help="ops in the table")
    args = p.parse_args(argv)
    sys.path.insert(0, args.code)
    from rpgrl.config import load_config
    from rpgrl.loop.generation import generate
    from rpgrl.loop.setup import setup_run

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, ["trainer.device=cpu"])
    data, model, tokenizer, _ = setup_run(cfg, log=lambda *a: print(*a, file=sys.stderr))
    model.eval()
    prompts = data.train_prompts[:args.prompts]
    r = cfg.rollout
    kw = {"with_logprobs": True} if "with_logprobs" in inspect.signature(generate).parameters else {}

    def one(seed: int):
        torch.manual_seed(seed)
        with torch.no_grad():
            return generate(model, tokenizer, prompts, n=r.n, max_new_tokens=r.max_new_tokens,
                            temperature=r.temperature, **kw)

    one(0)
    t0, tokens = time.perf_counter(), 0
    for s in range(args.rounds):
        tokens += int(one(s + 1).response_mask.sum())
    sec = (time.perf_counter() - t0) / args.rounds
    print(f"{len(prompts)} prompts x {r.n}, prompt tokens {[len(x) for x in prompts]}: "
          f"{sec:.2f} s per round, {tokens / args.rounds:.0f} response tokens per round")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for s in range(args.rounds):
            one(s + 1)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
