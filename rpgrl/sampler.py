"""The sampler: generate responses and score them into a ``RolloutBatch`` (spec Sec. 7).

One object serves training and evaluation, so another rollout engine (e.g. vLLM) is one
new class with the same three methods, not a branch in the trainer. ``sync(model)`` is
where such an engine would load the trainer's weights; this one samples from the module
itself, so it only records it.

``compute``: the context generation runs in -- the trainer passes its parallel strategy's
(bf16 autocast under mixed precision, ``rpgrl.parallel``), the one its log-prob passes use,
so the policy that samples computes like pi_old is scored (docs/precision.md).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Sequence

import torch

from rpgrl.data.verl import Example
from rpgrl.rewards import score_batch
from rpgrl.rollout import RolloutBatch, generate


class Sampler:
    """rpgrl's KV-cached loop or HF ``generate`` (``engine``), then the scorer."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, device: torch.device | str = "cpu",
                 engine: str = "auto", batch_size: int = 256, scorer: Callable | None = None,
                 timeout_s: float = 10.0, compute: Callable[[], ContextManager] = contextlib.nullcontext) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.engine, self.batch_size = engine, batch_size
        self.scorer, self.timeout_s, self.compute = scorer, timeout_s, compute

    def sync(self, model: torch.nn.Module) -> None:
        """Sample from ``model``'s current weights from now on."""
        self.model = model

    def generate(self, prompts: list[list[int]], *, n: int, max_new_tokens: int,
                 temperature: float, top_p: float = 1.0) -> RolloutBatch:
        """``n`` responses per prompt, grouped contiguously (temperature 0 = greedy)."""
        with self.compute():
            return generate(self.model, self.tokenizer, prompts, n=n, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, batch_size=self.batch_size,
                            device=self.device, engine=self.engine)

    def score(self, examples: Sequence[Example], rollout: RolloutBatch, n: int,
              details: list | None = None) -> tuple[list[float], dict]:
        """Scores of the ``n`` responses of each example, and the scorer's counters
        (``details``: see :func:`rpgrl.rewards.score_batch`)."""
        rep = lambda xs: [x for x in xs for _ in range(n)]  # noqa: E731
        return score_batch(rep([e.data_source for e in examples]), rollout.responses,
                           rep([e.ground_truth for e in examples]), rep([e.extra_info for e in examples]),
                           scorer=self.scorer, timeout_s=self.timeout_s, details=details)
