"""Model FLOP utilisation: useful model FLOPs per second / the machine's measured matmul peak.

"Useful" counts real tokens only (no padding, each shared prompt once) at the usual
2 FLOPs per weight-multiply per token (Kaplan et al.): a forward pass is 2 * N_matmul per
token, forward + backward 6 * N_matmul, where N_matmul counts the weights a token is
multiplied by (every linear layer, the LM head included, the embedding lookup excluded).
Attention-score FLOPs are left out (under 2 % at these lengths). Which tokens count:

- generation: each distinct prompt's tokens once (prefill) + every generated token;
- log-probs (no grad): each distinct prompt once + every scored response token;
- forward/backward: the same tokens as a log-prob pass, at 3x the cost.

The LM head multiplies only positions whose log-prob is needed (rpgrl.models.logprobs), so
prompt tokens are counted without it.
"""

from __future__ import annotations

import time

import torch
from torch import nn

__all__ = ["matmul_peak_gflops", "matmul_params", "PhaseFlops"]


def matmul_peak_gflops(size: int = 2048, seconds: float = 1.0, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> float:
    """Best-of GFLOP/s of a square matmul over about ``seconds`` (the denominator of MFU)."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b  # warm-up: thread pool, allocator
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


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
