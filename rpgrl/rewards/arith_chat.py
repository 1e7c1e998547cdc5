"""Scorer of the chat arithmetic task (data_source ``rpgrl/arith_chat``) for real LMs.

A pretrained instruct model asked "What is a + b? Reply as: Answer: <number>" usually
answers in its own words ("16 + 12 = 28"). Like lm-eval's GSM8K task, two extractions
are reported side by side so readers see how much of a gain is format and how much is
arithmetic:

- ``strict_acc``: the reply uses the requested form -- its last non-empty line is
  ``Answer: N`` -- and N is right (lm-eval "strict-match");
- ``acc``: the last number in the reply is right (lm-eval "flexible-extract"; verl's
  gsm8k scorer has the same "flexible" mode).

The reward is ``acc`` plus ``FORMAT_BONUS`` for a right answer in the strict form, so RL
has a signal from the start (the base model's last number is often right) and still
prefers the requested format. Held-out accuracy (``acc``) and ``strict_acc`` are measured
with this same function before and after training.

Numbers are read the way a person reads them, because an RL policy is paid for any
digit run the reader mistakes for its answer:

- a token is a run of letters/digits, joined by single ``. , - + / ^ * × ÷`` characters
  with no spaces (``2,8``, ``0.28``, ``1e-5``, ``10-28``, ``16+12`` are each one token);
  no number is read from inside a token;
- a token that starts with a digit is a number when it is a plain numeral: digits, or
  thousands groups of exactly three (``1,000,000``), with an optional decimal part.
  A decimal equal to an integer is that integer (``28.0`` = 28); ``28.5`` is not 28;
- any other token that starts with a digit (``2,8``, ``1,0,0,0``, ``12,34``, ``1e2``,
  ``10-28``, ``28x``, ``1.2.3``) is an unreadable number: when it comes last it pays
  nothing, whatever the ground truth (it is neither 28 nor a list ending in 8).
  A token that starts with a letter (``x2``) is a word and is skipped;
- ``-`` (and U+2212 and the other dashes typed as minus, but not the em dash, which is
  punctuation) glued to a number is its sign after ``=``, ``:``, a word or ``(``
  (``= -5``, ``is -5``, ``Answer: -5``), but not after a number on the same line: in
  ``10 - 28`` and ``10 -28`` it is a subtraction or range and the last number is 28.

Linear time: one ``str.translate``, one token scan with no overlapping quantifiers, and a
fullmatch of the last line, over at most ``MAX_CHARS`` characters (responses are capped
by max_new_tokens anyway; a longer one is cut at a token boundary, never inside one).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["score_arith_chat", "FORMAT_BONUS"]

FORMAT_BONUS = 0.2
MAX_CHARS = 4096
# Dashes people type as a minus sign -> "-"; non-breaking spaces -> " ".
_CANON = str.maketrans({
    "\u2212": "-", "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u02d7": "-",
    "\u2796": "-", "\ufe63": "-", "\uff0d": "-", "\u00a0": " ", "\u2009": " ", "\u202f": " ",
})
_ALNUM = r"[^\W_]"  # a letter or digit in any script (\w without "_", so "_28_" is 28)
_JOINERS = r"[-+.,/^*\u00d7\u00f7]"
# (sign)(token): each token starts where no letter/digit precedes it, so a digit run is
# never read from the middle of one; the joined groups are separated by one joiner each.
_TOKEN = re.compile(rf"(?<!{_ALNUM})(-(?=[0-9]))?({_ALNUM}+(?:{_JOINERS}{_ALNUM}+)*)")
_NUMERAL = re.compile(r"([+-]?)([0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.([0-9]+))?")
_STRICT = re.compile(r"answer:[ \t]*(\S+)", re.IGNORECASE)
_HEAD = re.compile(r"\S*")


def _integer(numeral: str) -> int | None:
    """Value of a plain numeral (``-1,000.00`` -> -1000) when it is an integer, else None."""
    m = _NUMERAL.fullmatch(numeral)
    if m is None or (m.group(3) and m.group(3).strip("0")) or len(m.group(2)) > MAX_CHARS:
        return None  # (longer digit runs exceed int()'s 4300-digit limit; none is an answer)
    value = int(m.group(2).replace(",", ""))
    return -value if m.group(1) == "-" else value


def _after_decimal_point(text: str, i: int) -> bool:
    """Whether ``text[i]`` follows a lone ``.`` (``.28``), not an ellipsis (``...28``)."""
    return i >= 1 and text[i - 1] == "." and (i == 1 or text[i - 2] != ".")


def _last_number(text: str) -> tuple[str | None, int | None]:
    """(last number-like token as read, its integer value or None) -- flexible extract."""
    last, last_sign = None, ""
    prev_end, prev_is_number = 0, False
    for m in _TOKEN.finditer(text):
        if not m.group(2)[0].isdigit():  # a word, or a word with digits in it ("x2")
            prev_end, prev_is_number = m.end(), False
            continue
        sign = m.group(1) or ""
        if sign and prev_is_number and not text[prev_end:m.start()].strip(" \t"):
            sign = ""  # "10 -28": a subtraction or range, not the number -28
        last, last_sign = m, sign
        prev_end, prev_is_number = m.end(), True
    if last is None:
        return None, None
    token = last.group(2)
    if not last_sign and _after_decimal_point(text, last.start(2)):
        return "." + token, None  # ".28": a fraction, never 28
    value = _integer(last_sign + token)
    return (str(value) if value is not None else last_sign + token), value


def _last_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip().strip("*").strip()
    return ""


def _strict_answer(text: str) -> int | None:
    """N when the last non-empty line is ``Answer: N`` (N one plain integer numeral)."""
    line = _last_line(text)
    if line.endswith("."):
        line = line[:-1].rstrip()
    m = _STRICT.fullmatch(line)
    return _integer(m.group(1)) if m else None


def score_arith_chat(solution_str: str, ground_truth: str) -> dict[str, Any]:
    """``{"score", "acc", "strict_acc", "pred"}`` for one reply (verl dict convention)."""
    text = solution_str or ""
    if len(text) > MAX_CHARS:  # keep the end, minus the token the cut may have split
        text = text[-MAX_CHARS:]
        text = text[_HEAD.match(text).end():]
    text = text.translate(_CANON)
    truth = int(str(ground_truth).strip())
    pred, value = _last_number(text)
    acc = value is not None and value == truth
    strict_value = _strict_answer(text)
    strict_acc = strict_value is not None and strict_value == truth
    score = float(acc) + (FORMAT_BONUS if strict_acc else 0.0)
    return {"score": score, "acc": acc, "strict_acc": strict_acc, "pred": pred}
