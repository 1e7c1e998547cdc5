"""Scorer of the chat arithmetic task (data_source ``rpgrl/arith_chat``) for real LMs.

A pretrained instruct model asked "What is a + b? Reply as: Answer: <number>" usually
answers in its own words ("16 + 12 = 28"). Like lm-eval's GSM8K task, two extractions
are reported side by side so readers see how much of a gain is format and how much is
arithmetic:

- ``strict_acc``: the reply uses the requested form -- its last non-empty line is
  ``Answer: N`` -- and N is right (lm-eval "strict-match");
- ``acc``: the last integer in the reply is right (lm-eval "flexible-extract"; verl's
  gsm8k scorer has the same "flexible" mode).

The reward is ``acc`` plus ``FORMAT_BONUS`` for a right answer in the strict form, so RL
has a signal from the start (the base model's last number is often right) and still
prefers the requested format. Held-out accuracy (``acc``) and ``strict_acc`` are measured
with this same function before and after training.

Linear time: two regex scans with no nested quantifiers over at most ``MAX_CHARS``
characters (responses are capped by max_new_tokens anyway).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["score_arith_chat", "FORMAT_BONUS"]

FORMAT_BONUS = 0.2
MAX_CHARS = 4096
_INT = re.compile(r"-?\d+")
_STRICT = re.compile(r"answer:[ \t]*(-?\d+)[ \t]*\.?[ \t]*", re.IGNORECASE)


def _last_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip().strip("*").strip()
    return ""


def score_arith_chat(solution_str: str, ground_truth: str) -> dict[str, Any]:
    """``{"score", "acc", "strict_acc", "pred"}`` for one reply (verl dict convention)."""
    text = (solution_str or "")[-MAX_CHARS:].replace(",", "")
    numbers = _INT.findall(text)
    pred = numbers[-1] if numbers else None
    truth = str(ground_truth).strip()
    acc = pred is not None and int(pred) == int(truth)
    strict = _STRICT.fullmatch(_last_line(text))
    strict_acc = strict is not None and int(strict.group(1)) == int(truth)
    score = float(acc) + (FORMAT_BONUS if strict_acc else 0.0)
    return {"score": score, "acc": acc, "strict_acc": strict_acc, "pred": pred}
