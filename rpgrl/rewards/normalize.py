"""Canonical string form of a final answer (docs/math.md §9: units, words and spaces
stripped, LaTeX fractions rewritten, etc.).

Written after the Minerva / verl ``math_dapo`` normaliser, with two deliberate changes:
units are only stripped at the *end* of an answer (so ``\\sqrt{km}`` is not mangled), and
commas are only removed from real thousands groups (``1,000`` -> ``1000`` but the list
``1,2`` stays a list). Both sides of a comparison go through the same function, so any
residual quirk is symmetric.

Two rules keep a hedged or wrong answer from normalising to the right one: ``LHS = RHS``
keeps only the right-hand side when the equation has exactly one ``=`` and its left side
*names a quantity* (``x``, ``m+n``, ``AB``, ``f(2)``), never for ``4 = 5``, ``x^2 = 4`` or
``12 or x = 13``; and a number followed by words keeps only the number when no word is a
connective, a hedge or a math word (``3 or 4``, ``5 maybe``, ``2 pi`` stay as they are).

Every regex here is linear on any input (no nested or adjacent unbounded quantifiers that
can share characters): a scorer runs on adversarial model output, in-process.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation, localcontext
from fractions import Fraction

from rpgrl.rewards.extract import brace_partners, unwrap_command

__all__ = ["normalize_answer", "as_rational"]

_UNICODE = {
    "\u2212": "-", "\u2013": "-", "\u2014": "-", "\u00d7": "\\times ", "\u00b7": "\\cdot ",
    "\u03c0": "\\pi ", "\u221a": "\\sqrt", "\u221e": "\\infty ", "\u00b0": "", "\u00a0": " ",
    "\u2009": " ", "\u202f": " ",
}
# Text-like wrappers become " X" so "5\text{m}" reads as "5 m" for the unit stripper.
_TEXT_WRAPPERS = ("\\text", "\\textbf", "\\textit", "\\textrm", "\\mathrm", "\\mbox")
_WRAPPERS = ("\\boxed", "\\fbox", "\\mathbf", "\\operatorname", "\\overline")
_DROP_LITERAL = ("\\!", "\\,", "\\;", "\\:", "\\%", "%", "^{\\circ}", "^\\circ", "{,}", "\\$",
                 "$", "**", "`", "\\(", "\\)", "\\[", "\\]")
_DROP_COMMANDS = re.compile(
    r"\\(?:left|right|displaystyle|quad|qquad|degree|circ|ldots|dots|cdots|bigl|bigr|Bigl|Bigr)"
    r"(?![A-Za-z])"
)
_UNITS = (
    "square", "sq", "cubic", "units?", "degrees?", "deg", "percent", "dollars?", "cents?",
    "inch(?:es)?", "in", "feet", "foot", "ft", "yards?", "yd", "miles?", "mi", "mph",
    "meters?", "metres?", "m", "cm", "mm", "km", "kg", "g", "gm", "grams?", "pounds?", "lbs?",
    "ounces?", "oz", "hours?", "hrs?", "h", "minutes?", "mins?", "seconds?", "secs?", "s",
    "days?", "weeks?", "months?", "years?", "ways", "points?", "students?", "people",
    "integers?", "digits?", "edges?", "meals?", "multiples?", "times", "sides?", "cups?",
    "liters?", "litres?", "ml", "L",
)
# A unit word (optionally squared/cubed) at the very end, after a number or a brace group
# and at least one space: "12 cm^2", "\\frac{1}{2} hours". Never "2a+m".
_UNIT_TAIL = re.compile(
    r"(?<=[\d}])\s+(?:" + "|".join(_UNITS) + r")(?:\^\{?[23]\}?)?$"
)
# "85 apples": a plain number followed by plain words of >= 2 letters.
_NUMBER_WORDS = re.compile(r"^([+-]?[\d.,/]+)\s+[A-Za-z]{2,}(?:\s+[A-Za-z]{2,})*$")
_CONNECTIVES = {"or", "and", "to", "plus", "minus", "times", "over", "by", "not", "nor", "but",
                "if", "else", "otherwise", "except", "than", "of", "per", "divided", "either",
                "at", "least", "most", "more", "less", "fewer", "under", "above", "below", "up",
                "with", "remainder"}
# A number followed by one of these is a hedge or an estimate, not an answer: "6 maybe".
_HEDGES = {"maybe", "perhaps", "possibly", "probably", "likely", "approximately", "approx",
           "about", "around", "roughly", "nearly", "almost", "circa", "guess", "unsure"}
# Words that change a number's value, so "2 pi" / "3 sqrt" / "2 million" are never read as
# "2" / "3" / "2" with a noun after them (a false positive against ground truth "2").
_MATH_WORDS = {
    "pi", "sqrt", "root", "roots", "cbrt", "inf", "infinity", "infty", "choose", "mod",
    "modulo", "factorial", "squared", "cubed", "power", "exp", "log", "ln", "lg", "sin",
    "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
    "hundred", "hundreds", "thousand", "thousands", "million", "millions", "billion",
    "billions", "trillion", "dozen", "dozens", "half", "halves", "third", "thirds", "fourth",
    "fourths", "quarter", "quarters", "fifth", "fifths", "sixth", "sixths", "seventh",
    "sevenths", "eighth", "eighths", "ninth", "ninths", "tenth", "tenths", "hundredth",
    "hundredths", "thousandth", "thousandths",
}
_KEEP_WORDS = _CONNECTIVES | _HEDGES | _MATH_WORDS
_EQ_SPLIT = re.compile(r"(?<![<>!\\])=(?!=)")
_CMD_SPACE = re.compile(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])")
_FRAC_SHORT = re.compile(r"\\frac(?:(\d)(\d)|(\d)\{|\{([^{}]*)\}(\d))")
_SQRT_SHORT = re.compile(r"\\sqrt ?(\d+|[A-Za-z](?![A-Za-z]))")
_SIMPLE_FRAC = re.compile(r"([+-]?)\\frac\{([+-]?)(\d+)\}\{([+-]?)(\d+)\}")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
# Not "\d+\.?\d*": there \d+ and \d* can split a digit run in n ways, so a fullmatch on
# "1" * n + "x" takes quadratic time (8 s on a 30,000-character answer).
_MANTISSA = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_DECIMAL = re.compile(_MANTISSA)
_EXPONENT = r"\^(?:\{([+-]?\d{1,4})\}|(\d))"  # 10^{-3}, 10^3 (10^12 in LaTeX is 10^1 2)
# Scientific notation is a way to write a number, not a computation: "10^3", "1.5\times10^{3}".
_POW10 = re.compile(r"([+-]?)(?:10|\{10\})" + _EXPONENT)
_SCI = re.compile("(" + _MANTISSA + r")(?:\\times|\\cdot|\*)(?:10|\{10\})" + _EXPONENT)
_MAX_POW10 = 100  # |exponent| above this stays symbolic (the canonical string would be long)
# Left side of "LHS = value" that names a quantity: x, x_1, \theta, AB, \angle A, |z|,
# area, f(2), and sums like m+n or 100m+n (AIME's "find m+n"). A single term takes no
# coefficient or sign: "2x = 6" and "-x = 5" say x = 3 and x = -5.
_NAME = (r"(?:m?\\angle ?)?"
         r"(?:[A-Za-z]|[A-Z]{2,3}|[A-Za-z][a-z]{2,11}|\\[A-Za-z]{2,8}|\|[A-Za-z]{1,3}\|)"
         r"(?:_(?:\d|[A-Za-z]|\{[A-Za-z0-9]{1,4}\}))?'{0,3}(?:\([A-Za-z0-9,]{1,8}\))?")
_NAMED_LHS = re.compile(_NAME + r"|\d{0,4}" + _NAME + r"(?:[+-]\d{0,4}" + _NAME + ")+")
_NOT_NAMES = {"\\pi", "\\infty", "\\sqrt", "\\frac", "\\cdot", "\\times", "\\pm", "\\mp"}
_RATIONAL = re.compile(r"([+-]?\d+)/(\d+)")
_CHOICE = re.compile(r"\(([A-Ea-e])\)")


def _fix_frac_shorthand(m: re.Match) -> str:
    if m.group(1) is not None:  # \frac12
        return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    if m.group(3) is not None:  # \frac1{2}
        return f"\\frac{{{m.group(3)}}}{{"
    return f"\\frac{{{m.group(4)}}}{{{m.group(5)}}}"  # \frac{1}2


def _names_a_quantity(lhs: str) -> bool:
    """Whether ``lhs`` (left of the only ``=``) names what is asked: ``x``, ``m + n``, ``AB``.

    Not a number (``4 = 5``), not a computation on a variable (``x^2 = 4``), not a hedge
    (``12 or x = 13``): for those the right-hand side is not the answer.
    """
    lhs = lhs.strip()
    if not lhs or len(lhs) > 40:
        return False
    lhs = re.sub(r"\s*([+-])\s*", r"\1", lhs)
    if not _NAMED_LHS.fullmatch(lhs):
        return False
    words = re.findall(r"\\?[A-Za-z]+", lhs)
    return not any(w.lower() in _KEEP_WORDS or w in _NOT_NAMES for w in words)


def _strip_outer_braces(s: str) -> str:
    """``{5}`` / ``{{5}}`` -> ``5`` (a bare group, not the set ``\\{5\\}``)."""
    if not (s.startswith("{") and s.endswith("}")):
        return s
    partners = brace_partners(s)
    i, j = 0, len(s) - 1
    while i < j and s[i] == "{" and partners.get(i) == j:
        i, j = i + 1, j - 1
    return s[i : j + 1]


def _canonical_decimal(text: str) -> str | None:
    """Canonical decimal string of an exact numeral (``3.0`` -> ``3``), without rounding."""
    if "." not in text and "E" not in text:  # an integer: the common case, kept cheap
        digits = text.lstrip("+-").lstrip("0") or "0"
        return "-" + digits if text.startswith("-") and digits != "0" else digits
    try:
        with localcontext() as ctx:
            ctx.prec = len(text) + 8  # Decimal's default 28 digits would round long numerals
            d = Decimal(text).normalize()
            return "0" if d == 0 else format(d, "f")
    except (InvalidOperation, ValueError):
        return None


def _scientific(s: str) -> str | None:
    """``10^3`` / ``-10^{-2}`` / ``1.5\\times10^{3}`` as a plain decimal, else None."""
    m = _POW10.fullmatch(s)
    if m:
        mantissa, exp = m.group(1) + "1", m.group(2) or m.group(3)
    else:
        m = _SCI.fullmatch(s)
        if not m:
            return None
        mantissa, exp = m.group(1), m.group(2) or m.group(3)
    if abs(int(exp)) > _MAX_POW10:
        return None
    return _canonical_decimal(f"{mantissa}E{exp}")


def _remove_spaces(s: str) -> str:
    """Drop all whitespace except one space between a command name and a letter."""
    s = _CMD_SPACE.sub("\\1\x00", s)
    return re.sub(r"\s+", "", s).replace("\x00", " ")


def normalize_answer(answer: str) -> str:
    """Canonical form of one extracted answer; equal strings mean equal answers.

    Steps: unicode math -> LaTeX; unwrap \\text{}/\\boxed{}/\\mathrm{}; drop delimiters
    ($, \\(, \\[), spacing commands, \\left/\\right, degree and percent signs; keep the
    right-hand side of ``x = 3``; strip trailing units; \\dfrac/\\tfrac -> \\frac and
    \\frac12 -> \\frac{1}{2}; remove spaces; drop trailing punctuation and thousands
    separators; write integer fractions as ``a/b`` and decimals canonically (``3.0`` -> ``3``).
    """
    s = answer.strip()
    for k, v in _UNICODE.items():
        if k in s:
            s = s.replace(k, v)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\cfrac", "\\frac")
    for w in _WRAPPERS:
        if w in s:
            s = unwrap_command(s, w)
    for w in _TEXT_WRAPPERS:
        if w in s:
            s = unwrap_command(s, w, prefix=" ")
    for d in _DROP_LITERAL:
        if d in s:
            s = s.replace(d, "")
    if "\\" in s:
        s = _DROP_COMMANDS.sub(" ", s).replace("\\ ", " ")
    s = s.strip().rstrip(".,;").strip()
    if "=" in s:
        sides = _EQ_SPLIT.split(s)
        if len(sides) == 2 and _names_a_quantity(sides[0]):
            s = sides[1].strip()
    for _ in range(2):  # "5 square feet"
        stripped = _UNIT_TAIL.sub("", s).strip()
        if stripped == s:
            break
        s = stripped
    m = _NUMBER_WORDS.match(s)
    if m and not _KEEP_WORDS.intersection(s[m.end(1):].lower().split()):
        s = m.group(1)  # "85 apples" -> "85", but never "3 or 4" / "2 pi" -> "3" / "2"
    s = _strip_outer_braces(_remove_spaces(s).rstrip(".,;"))
    if "\\frac" in s:
        s = _FRAC_SHORT.sub(_fix_frac_shorthand, s)
    if "\\sqrt" in s:
        s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    m = _SIMPLE_FRAC.fullmatch(s)
    if m:
        negative = (m.group(1) + m.group(2) + m.group(4)).count("-") % 2 == 1
        s = f"{'-' if negative else ''}{m.group(3)}/{m.group(5)}"
    if _DECIMAL.fullmatch(s):
        s = _canonical_decimal(s) or s
    elif "10" in s and "^" in s:
        s = _scientific(s) or s
    m = _CHOICE.fullmatch(s)
    if m:
        s = m.group(1).upper()
    return s


def as_rational(s: str) -> Fraction | None:
    """Exact value of a normalised plain number (``12``, ``-0.5``, ``3/4``), else ``None``."""
    if len(s) > 200:
        return None
    try:
        if _DECIMAL.fullmatch(s):
            return Fraction(s)
        m = _RATIONAL.fullmatch(s)
        if m and int(m.group(2)) != 0:
            return Fraction(int(m.group(1)), int(m.group(2)))
    except (ValueError, ZeroDivisionError):
        return None
    return None
