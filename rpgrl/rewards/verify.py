"""Symbolic equivalence through ``math_verify`` (the slow, general fallback).

math-verify bounds its own work with ``signal.alarm``, which only works in the main thread
of the main interpreter; elsewhere we pass ``None`` (no internal timeout) and the caller
must bound the time itself (``rpgrl.rewards.safe`` runs such work in a killable worker
process). The import is lazy: sympy costs ~0.3 s and the fast path never needs it.

math-verify is the one scorer step that is not linear: its parser is exponential in the
bracket depth (20 nested parentheses: 5 s) and sympy evaluates what it is given
(``9^{9^{9^{9}}}``, ``100000000!``, ``(x+1)^{999}``: each runs to the timeout). So a
prediction reaches it only if :func:`symbolic_cost` finds it small: a length cap, a
bracket-depth cap, no numeric power tower, exponent or factorial argument of 3+ digits,
no sums/products/integrals/limits. math-verify's own timeout stays as the backstop.
"""

from __future__ import annotations

import functools
import logging
import re
import threading

__all__ = ["symbolic_equal", "math_verify_score", "in_main_thread", "symbolic_cost"]

MAX_SYMBOLIC_CHARS = 200
MAX_SYMBOLIC_DEPTH = 6
MAX_MATH_VERIFY_CHARS = 1000  # math_verify scorer: only the tail of a response is parsed
_NEVER_SYMBOLIC = ("\\sum", "\\prod", "\\int", "\\lim", "\\Gamma", "\\binom", "\\choose")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_LONG_DIGITS = re.compile(r"\d{3}")
# Math spans math-verify may extract and parse. Lazy scans to the next delimiter: at worst
# quadratic in the (capped, 1000-character) tail, never exponential.
_MATH_SPAN = re.compile(r"\$\$(.*?)\$\$|\$(.*?)\$|\\\[(.*?)\\\]|\\\((.*?)\\\)", re.DOTALL)

log = logging.getLogger(__name__)


def in_main_thread() -> bool:
    """True when signal-based timeouts (math-verify's) can be armed here."""
    return threading.current_thread() is threading.main_thread()


def _exponent(s: str, i: int, partners: dict[int, int]) -> str:
    """The exponent written after the ``^`` at ``s[i]``: a brace group or one character."""
    j = i + 1
    if j < len(s) and s[j] == "{":
        end = partners.get(j)
        return s[j + 1 : end] if end is not None else s[j + 1 :]
    return s[j : j + 1]


def bracket_depth(text: str) -> int:
    """Deepest nesting of ``( [ {`` in ``text`` (math-verify's parse time grows ~1.5x per level)."""
    depth = top = 0
    for c in text:
        if c in "([{":
            depth += 1
            top = max(top, depth)
        elif c in ")]}":
            depth -= 1
    return top


def symbolic_cost(text: str, max_chars: int | None = MAX_SYMBOLIC_CHARS) -> str | None:
    """Why ``text`` is too costly to hand to math-verify/sympy, or None if it is not.

    Linear in ``len(text)``. The caps are far above any real final answer (a 3x3 matrix of
    fractions is ~150 characters and depth 3). ``max_chars=None``: no length cap.
    """
    from rpgrl.rewards.extract import brace_partners

    if max_chars is not None and len(text) > max_chars:
        return f"longer than {max_chars} characters"
    if bracket_depth(text) > MAX_SYMBOLIC_DEPTH:
        return f"brackets nested deeper than {MAX_SYMBOLIC_DEPTH}"
    for cmd in _NEVER_SYMBOLIC:
        if cmd in text:
            return f"contains {cmd}"
    if "^" in text:
        partners = brace_partners(text)
        for i, c in enumerate(text):
            if c != "^":
                continue
            exp = _exponent(text, i, partners)
            if _LONG_DIGITS.search(exp):
                return f"exponent {exp!r} has 3+ digits"
            if ("^" in exp or "!" in exp) and not re.search("[A-Za-z]", _COMMAND.sub("", exp)):
                return f"numeric power tower in exponent {exp!r}"
    if "!" in text:
        for i, c in enumerate(text):
            if c != "!" or i == 0:
                continue
            j = i - 1
            while j >= 0 and text[j].isdigit():
                j -= 1
            if i - 1 - j >= 3:
                return "factorial of a number with 3+ digits"
            if j == i - 1 and text[j] in ")}!":
                return "factorial of a bracketed expression"
    return None


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
    must never crash training. So does a prediction that :func:`symbolic_cost` finds too
    costly. Results are cached, since a group of rollouts often repeats the same answer.
    """
    cost = symbolic_cost(pred)
    if cost is not None:
        log.debug("math-verify skipped for pred=%.80r: %s", pred, cost)
        return False
    try:
        return _symbolic_equal(pred, gold, _timeout(timeout_s))
    except Exception as exc:  # math-verify raises on odd input / timeouts in some versions
        log.debug("math-verify failed on pred=%r gold=%r: %r", pred, gold, exc)
        return False


def _blank_if_costly(m: re.Match) -> str:
    content = next(g for g in m.groups() if g is not None)
    return " " if symbolic_cost(content) is not None else m.group(0)


def math_verify_score(solution: str, gold: str, timeout_s: float | None = 5.0) -> bool:
    """math-verify's own extraction over the response (no "Answer:" convention).

    Only the last :data:`MAX_MATH_VERIFY_CHARS` characters are parsed (final answers sit
    at the end); they must not nest brackets deeper than :data:`MAX_SYMBOLIC_DEPTH` (parse
    time), and the final answer rpgrl's extractor finds there, and the one math-verify
    extracts, must pass :func:`symbolic_cost` (evaluation time). What math-verify parses
    elsewhere is cheap: every ``$...$`` / ``\\[...\\]`` / ``\\(...\\)`` span of the tail that
    :func:`symbolic_cost` finds costly is blanked out before math-verify sees it.
    """
    from math_verify import parse, verify

    from rpgrl.rewards.extract import extract_final_answer

    tail = solution[-MAX_MATH_VERIFY_CHARS:]
    if bracket_depth(tail) > MAX_SYMBOLIC_DEPTH:
        return False
    ours = extract_final_answer(tail, "auto")
    if ours is not None and symbolic_cost(ours, max_chars=None) is not None:
        return False
    tail = _MATH_SPAN.sub(_blank_if_costly, tail)
    t = _timeout(timeout_s)
    try:
        g = _parse("\\boxed{" + gold + "}", t)
        p = parse(tail, parsing_timeout=t)
        if p and isinstance(p[-1], str) and symbolic_cost(p[-1]) is not None:
            return False  # what math-verify extracted itself would be evaluated unbounded
        return bool(g and p and verify(g, p, timeout_seconds=t))
    except Exception as exc:
        log.debug("math-verify failed on gold=%r: %r", gold, exc)
        return False
