"""Model FLOP utilisation: useful model FLOPs per second / the machine's measured matmul peak
in the dtype the matmuls run in (:func:`matmul_peaks`: fp32 and bf16 both measured; under bf16
mixed precision MFU divides by the bf16 peak, even for the fp32 LM head, so it never flatters).

"Useful" counts real tokens only (no padding, each shared prompt once) at the usual
2 FLOPs per weight-multiply per token (Kaplan et al.): a forward pass is 2 * N_matmul per
token, forward + backward 6 * N_matmul, where N_matmul counts the weights a token is
multiplied by (every linear layer, the LM head included, the embedding lookup excluded).
Attention-score FLOPs are left out (under 2 % at these lengths). Which tokens count:

- generation: each distinct prompt's tokens once (prefill) + every generated token of the
  batch the step trains on (``mfu/generation_sampled``: of every sampling round, the groups
  dynamic sampling dropped included);
- log-probs (no grad): each distinct prompt once + every scored response token;
- forward/backward: the same tokens as a log-prob pass, at 3x the cost (``mfu/forward_backward_scheduled``:
  each prompt once per micro-batch it appears in, as shuffled mini-batches make the update run it,
  the prompts' common prefix once per micro-batch;
  ``rpgrl.loop.metrics.mfu_metrics``).

The LM head multiplies only positions whose log-prob is needed (rpgrl.models.logprobs), so
prompt tokens are counted without it.
"""

from __future__ import annotations

import time

import torch
from torch import nn

__all__ = ["matmul_peak_gflops", "matmul_peaks", "peak_for", "matmul_params", "PhaseFlops"]

#: The smallest square side :func:`matmul_peak_gflops` times.
MIN_PEAK_SIZE = 256


def matmul_peak_gflops(size: int = 2048, seconds: float = 1.0, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> float:
    """Best GFLOP/s of square matmuls of side 256, 512, ... up to ``size`` in the three layouts
    of a linear layer's forward and backward (``a @ b``, ``a @ b.T``, ``a.T @ b``), each timed
    best-of over an equal share of about ``seconds`` (the denominator of MFU).

    Fast kernels peak at the largest size whatever the layout (GPUs, AMX). Emulated ones (bf16
    on a CPU without bf16 units) run 4-40x below fp32, slowest at large sizes and up to 10x
    apart between layouts; the best of all counts, so MFU is never measured against a slow
    kernel. A layout whose one matmul would take over ``seconds`` at the next size (8x its
    time at this one) is not run there: bf16 ``a @ b`` at 2048^3 would take ~50 s on an AVX2 core.
    """
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def once(fn) -> float:
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    sizes = [MIN_PEAK_SIZE * 2**i for i in range(8) if MIN_PEAK_SIZE * 2**i <= size] or [size]
    share = seconds / (3 * len(sizes))
    best_rate, last = 0.0, [0.0, 0.0, 0.0]  # each layout's best time at the previous size
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        for i, fn in enumerate((lambda: a @ b, lambda: a @ b.T, lambda: a.T @ b)):
            if last[i] * 8 > seconds:
                continue
            best = once(fn)  # warm-up (thread pool, allocator, kernel choice), kept if slower runs follow
            start = time.perf_counter()
            while time.perf_counter() - start < share:
                best = min(best, once(fn))
            best_rate, last[i] = max(best_rate, 2 * n**3 / best / 1e9), best
        if min(last) * 8 > seconds:
            break
    return best_rate


def matmul_peaks(device: str | torch.device = "cpu", seconds: float = 1.0) -> dict[str, float]:
    """Measured matmul peaks in GFLOP/s, ``{"float32": ..., "bfloat16": ...}`` (the ``machine``
    info of a profile: how far bf16 is ahead of fp32 on this hardware, if at all)."""
    return {str(dt).removeprefix("torch."): matmul_peak_gflops(seconds=seconds, dtype=dt, device=device)
            for dt in (torch.float32, torch.bfloat16)}


def peak_for(peaks: dict[str, float], compute_dtype: torch.dtype) -> float:
    """The peak MFU divides by: the one of the dtype the matmuls run in."""
    return peaks[str(compute_dtype).removeprefix("torch.")]


def matmul_params(model: nn.Module) -> tuple[int, int]:
    """(weights multiplied per token without the LM head, LM-head weights).

    Embedding tables are looked up, not multiplied; a tied LM head is counted once as the
    head. Works for any HF causal LM (``get_input_embeddings`` / ``get_output_embeddings``).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    emb = base.get_input_embeddings()
    skip = {id(p) for m in (head, emb) if m is not None for p in m.parameters()}
    body = sum(p.numel() for p in base.parameters() if id(p) not in skip and p.dim() >= 2)
    head_n = head.weight.numel() if head is not None else 0
    return body, head_n


class PhaseFlops:
    """Useful FLOPs of one model, per phase, from token counts."""

    def __init__(self, model: nn.Module) -> None:
        self.body, self.head = matmul_params(model)

    def forward(self, prompt_tokens: int, scored_tokens: int) -> float:
        """One no-grad pass: prompts through the body, scored tokens through body + head."""
        return 2.0 * (self.body * (prompt_tokens + scored_tokens) + self.head * scored_tokens)

    def generation(self, prompt_tokens: int, generated_tokens: int) -> float:
        """Prefill (each prompt's last position needs the head too) + one step per token."""
        return self.forward(prompt_tokens, generated_tokens)

    def train(self, prompt_tokens: int, scored_tokens: int) -> float:
        """Forward + backward (backward = 2x forward)."""
        return 3.0 * self.forward(prompt_tokens, scored_tokens)
