"""One sampling round of the study's step under three weight layouts, interleaved.

    python benchmarks/bench_decode_layout.py --reps 5

``row``: every weight row-major (as torch and the update keep them); ``column``: every fp32
linear weight column-major, what the trainer's sampler holds (``rpgrl.models.layout``);
``column-but-head``: the same except the LM head (tied to the input embedding in SmolLM2), the
refinement the shape benchmark (``bench_matmul_shapes.py --decode-layouts``) suggests, since
the LM head's product alone is slower column-major at M = 64 and 32. A round = the first 8
training prompts of ``--config`` x n samples through the trainer's sampler with pi_old's scores,
two seeds; the layouts take turns, ``--reps`` times. Printed: seconds per round of each turn,
the median per layout, and the response tokens (the same in every layout unless a draw flips
on float round-off).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("row", "column", "column-but-head")


@contextlib.contextmanager
def _column_but_head(model: torch.nn.Module):
    """Column-major linear weights except the output embedding's (restored on exit)."""
    head = model.get_output_embeddings().weight
    kept = []
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and w is not head and all(w is not k for k, _ in kept):
            kept.append((w, w.data))
            w.data = w.data.t().contiguous().t()
    try:
        yield
    finally:
        for w, row in kept:
            w.data = row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/real/study.yaml"))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    from rpgrl.config import load_config
    from rpgrl.loop.generation import generate
    from rpgrl.loop.host_memory import keep_freed_memory
    from rpgrl.loop.setup import setup_run
    from rpgrl.models.layout import decoding_layout

    keep_freed_memory()  # as the trainer does on CPU
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, ["trainer.device=cpu"])
    data, model, tokenizer, _ = setup_run(cfg, log=lambda *a: print(*a, file=sys.stderr))
    model.eval()
    prompts, r = data.train_prompts[:8], cfg.rollout
    contexts = {"row": contextlib.nullcontext, "column": lambda: decoding_layout(model),
                "column-but-head": lambda: _column_but_head(model)}

    def rounds() -> tuple[float, list[int]]:
        t0, tokens = time.perf_counter(), []
        for seed in (1, 2):
            torch.manual_seed(seed)
            out = generate(model, tokenizer, prompts, n=r.n, max_new_tokens=r.max_new_tokens,
                           temperature=r.temperature, with_logprobs=True)
            tokens.append(int(out.response_mask.sum()))
        return (time.perf_counter() - t0) / 2, tokens

    rounds()  # warm-up
    seconds: dict[str, list[float]] = {k: [] for k in LAYOUTS}
    for rep in range(args.reps):
        for name in LAYOUTS:
            with contexts[name]():
                sec, tokens = rounds()
            seconds[name].append(sec)
            print(f"rep {rep + 1} {name}: {sec:.2f} s per round, response tokens {tokens}", flush=True)
    for name in LAYOUTS:
        print(f"{name}: median {statistics.median(seconds[name]):.2f} s per round "
              f"({', '.join(f'{s:.2f}' for s in seconds[name])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
