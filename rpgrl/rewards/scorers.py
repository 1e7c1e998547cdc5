"""Built-in answer scorers: one kernel, configured by extraction mode and fallback.

All return verl's ``math_dapo`` dict ``{"score", "acc", "pred"}`` with score 1.0 / 0.0
(verl's math_dapo uses -1 for wrong; docs/math.md §9: rewards are accuracies in [0, 1]).

Speed matters: the CPU trainer scores ~128 short responses per step. The comparison
therefore goes cheapest-first: normalised string match, then exact rational comparison
when both sides are plain numbers, and math-verify only for non-numeric ground truths.
When the ground truth is a plain number the prediction must be a plain number too; this
keeps an unevaluated expression such as ``Answer: 37+48`` (the question itself, on the
built-in addition task) from being graded correct by symbolic evaluation. "Plain number"
means a numeral in any standard notation (``1000``, ``1,000``, ``1000.0``, ``{1000}``,
``\\frac{2000}{2}``, ``10^3``, ``1\\times10^{3}``), never a computation (``37+48``,
``2^{10}``, ``\\sqrt{4}``, ``5\\cdot 200``): normalisation rewrites the notations to one
canonical decimal, exactly, without math-verify.

Every step is linear in the response length or capped: an extracted answer longer than
``MAX_ANSWER_CHARS`` scores 0 unread, and math-verify only sees predictions that
``verify.symbolic_cost`` finds small (the built-in scorers run in-process, and verl calls
``compute_score`` directly, so nothing else would stop a pathological response).
"""

from __future__ import annotations

import functools
from typing import Any

from rpgrl.rewards.arith_chat import score_arith_chat
from rpgrl.rewards.extract import extract_final_answer
from rpgrl.rewards.normalize import as_rational, normalize_answer
from rpgrl.rewards.verify import math_verify_score, symbolic_equal

__all__ = ["answers_match", "score_response", "BUILTIN_SCORERS", "MAX_ANSWER_CHARS"]

MAX_ANSWER_CHARS = 1000  # no final answer is this long; longer ones score 0 unread


@functools.lru_cache(maxsize=4096)
def _normalized_truth(ground_truth: str):
    """Ground truths repeat across a group and across steps: normalise each once."""
    g = normalize_answer(str(ground_truth))
    return g, as_rational(g)


def answers_match(pred: str, ground_truth: str, symbolic: bool = True,
                  timeout_s: float | None = 5.0) -> tuple[bool, str]:
    """(equivalent?, normalised prediction) for one extracted answer.

    An answer longer than ``MAX_ANSWER_CHARS`` is not equivalent (normalised as ``""``).
    """
    if len(pred) > MAX_ANSWER_CHARS:
        return False, ""
    p = normalize_answer(pred)
    g, g_val = _normalized_truth(ground_truth)
    if not p:
        return False, p
    if p == g:
        return True, p
    if g_val is not None:  # numeric truth: the prediction must be the same number
        p_val = as_rational(p)
        return (p_val is not None and p_val == g_val), p
    if not symbolic:
        return False, p
    return symbolic_equal(p, g, timeout_s), p


def score_response(solution_str: str, ground_truth: str, *, extract: str = "auto",
                   symbolic: bool = True, timeout_s: float | None = 5.0) -> dict[str, Any]:
    """The scoring kernel: extract the final answer (``extract`` = auto/answer/boxed),
    compare it with the ground truth, return ``{"score", "acc", "pred"}``."""
    if not solution_str:
        return {"score": 0.0, "acc": False, "pred": None}
    raw = extract_final_answer(solution_str, extract)
    if raw is None:
        return {"score": 0.0, "acc": False, "pred": None}
    ok, pred = answers_match(raw, ground_truth, symbolic, timeout_s)
    return {"score": 1.0 if ok else 0.0, "acc": ok, "pred": pred}


def _score_math_verify(solution_str: str, ground_truth: str, timeout_s: float | None = 5.0) -> dict:
    if not solution_str:
        return {"score": 0.0, "acc": False, "pred": None}
    ok = math_verify_score(solution_str, str(ground_truth), timeout_s)
    return {"score": 1.0 if ok else 0.0, "acc": ok, "pred": None}


# name -> scorer(solution_str, ground_truth) -> dict
BUILTIN_SCORERS = {
    # "Answer:" if present, else \boxed{}; normalised match, math-verify fallback.
    "default": functools.partial(score_response, extract="auto", symbolic=True),
    # verl math_dapo semantics: last "Answer:" line, normalised string/number match only.
    "dapo": functools.partial(score_response, extract="answer", symbolic=False),
    # last \boxed{} with math-verify fallback (MATH-style prompts).
    "boxed": functools.partial(score_response, extract="boxed", symbolic=True),
    # math-verify's own extraction over the whole response.
    "math_verify": _score_math_verify,
    # the chat arithmetic task for real LMs: last-number accuracy + strict-format bonus.
    "arith_chat": score_arith_chat,
}
