"""Evaluate a policy on held-out problems: k samples per distinct problem, scored, summarized.

Mean@k files (docs/math.md §9) repeat each problem k times; problems are de-duplicated by
``Example.uid`` and sampled ``k`` times here, so ``--k 32`` on AIME gives Mean@32 over the
30 distinct problems whether or not the file already repeats them.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from rpgrl.data.verl import Example
from rpgrl.loop.eval_metrics import summarize
from rpgrl.loop.generation import Sampler
from rpgrl.loop.metrics import CORRECT_SCORE_ABOVE


def distinct_problems(examples: list[Example], prompts: list[list[int]], max_problems: int = 0):
    seen: dict[str, int] = {}
    for i, ex in enumerate(examples):
        seen.setdefault(ex.uid, i)
    idx = list(seen.values())
    if max_problems:
        idx = idx[:max_problems]
    return [examples[i] for i in idx], [prompts[i] for i in idx]


def secondary_metrics(details: list[dict | None]) -> dict[str, float]:
    """Means of the extra boolean/numeric fields a scorer returns beside ``score``/``acc``
    (e.g. ``strict_acc`` of the chat arithmetic task), over all samples; a failed or
    float-returning sample counts as 0."""
    keys = sorted({k for d in details if d for k, v in d.items()
                   if k not in ("score", "acc") and isinstance(v, (bool, int, float))})
    n = max(len(details), 1)
    return {k: sum(float(d.get(k) or 0) for d in details if d) / n for k in keys}


@torch.no_grad()
def evaluate_policy(
    model, tokenizer, examples: list[Example], prompts: list[list[int]], *, k: int = 1,
    temperature: float = 0.0, max_new_tokens: int, max_problems: int = 0, batch_size: int = 256,
    device: torch.device | str = "cpu", scorer: Callable | None = None, timeout_s: float = 10.0,
    engine: str = "auto", compute=contextlib.nullcontext,
) -> dict:
    """:func:`evaluate_with` a :class:`~rpgrl.loop.generation.Sampler` over ``model``
    (``compute``: the precision context generation runs in, as in training)."""
    sampler = Sampler(model, tokenizer, device=device, engine=engine, batch_size=batch_size,
                      scorer=scorer, timeout_s=timeout_s, compute=compute)
    return evaluate_with(sampler, examples, prompts, k=k, temperature=temperature,
                         max_new_tokens=max_new_tokens, max_problems=max_problems)


@torch.no_grad()
def evaluate_with(sampler: Sampler, examples: list[Example], prompts: list[list[int]], *, k: int = 1,
                  temperature: float = 0.0, max_new_tokens: int, max_problems: int = 0) -> dict:
    """Returns {"accuracy": overall mean@k, "by_source": {...}, "overall": {...}, "secondary":
    {e.g. "strict_acc": mean}, "samples": [...] (first few)}."""
    if not examples:
        return {"accuracy": float("nan"), "by_source": {}, "overall": {}}
    examples, prompts = distinct_problems(examples, prompts, max_problems)
    with sampler.decoding():
        rollout = sampler.generate(prompts, n=k, max_new_tokens=max_new_tokens, temperature=temperature)
    details: list = []
    scores, stats = sampler.score(examples, rollout, k, details=details)
    records = [
        {"data_source": ex.data_source, "uid": ex.uid, "score": s,
         "acc": bool(d["acc"]) if d and isinstance(d.get("acc"), (bool, int)) else s > CORRECT_SCORE_ABOVE}
        for ex, s, d in zip([e for e in examples for _ in range(k)], scores, details)
    ]
    summary = summarize(records, k=k)
    return {
        "accuracy": float(summary["overall"][f"mean@{k}"]),
        "secondary": secondary_metrics(details),
        "by_source": summary["by_source"],
        "overall": summary["overall"],
        "scorer_stats": stats,
        "samples": [
            {"uid": r["uid"], "response": t, "score": r["score"]}
            for r, t in list(zip(records, rollout.responses))[:8]
        ],
    }
