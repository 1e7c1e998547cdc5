"""Symbolic equivalence through ``math_verify`` (the slow, general fallback).

math-verify bounds its own work with ``signal.alarm``, which only works in the main thread
of the main interpreter; elsewhere we pass ``None`` (no internal timeout) and the caller
must bound the time itself (``rpgrl.rewards.safe`` runs such work in a killable worker
process). The import is lazy: sympy costs ~0.3 s and the fast path never needs it.
"""

from __future__ import annotations

import functools
import logging
import threading

__all__ = ["symbolic_equal", "math_verify_score", "in_main_thread"]

log = logging.getLogger(__name__)


def in_main_thread() -> bool:
    """True when signal-based timeouts (math-verify's) can be armed here."""
    return threading.current_thread() is threading.main_thread()


def _timeout(timeout_s: float | None) -> int | None:
    if timeout_s is None or not in_main_thread():
        return None
    return max(1, int(round(timeout_s)))  # signal.alarm has whole-second resolution


@functools.lru_cache(maxsize=8192)
def _parse(text: str, timeout: int | None):
    from math_verify import parse

    return parse(text, parsing_timeout=timeout)


@functools.lru_cache(maxsize=8192)
def _symbolic_equal(pred: str, gold: str, timeout: int | None) -> bool:
    from math_verify import verify

    g = _parse("\\boxed{" + gold + "}", timeout)
    p = _parse("\\boxed{" + pred + "}", timeout)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=timeout))


def symbolic_equal(pred: str, gold: str, timeout_s: float | None = 5.0) -> bool:
    """Whether math-verify finds ``pred`` and ``gold`` (normalised answers) equivalent.

    Any math-verify failure (parse error, timeout) counts as "not equivalent": a grader
    must never crash training. Results are cached, since a group of rollouts often repeats
    the same answer.
    """
    try:
        return _symbolic_equal(pred, gold, _timeout(timeout_s))
    except Exception as exc:  # math-verify raises on odd input / timeouts in some versions
        log.debug("math-verify failed on pred=%r gold=%r: %r", pred, gold, exc)
        return False


def math_verify_score(solution: str, gold: str, timeout_s: float | None = 5.0) -> bool:
    """math-verify's own extraction over the whole response (no "Answer:" convention)."""
    from math_verify import parse, verify

    t = _timeout(timeout_s)
    try:
        g = _parse("\\boxed{" + gold + "}", t)
        p = parse(solution, parsing_timeout=t)
        return bool(g and p and verify(g, p, timeout_seconds=t))
    except Exception as exc:
        log.debug("math-verify failed on gold=%r: %r", gold, exc)
        return False
