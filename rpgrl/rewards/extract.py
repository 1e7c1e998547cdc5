"""Find the final answer inside a model response (docs/math.md §9).

Two conventions exist in the data this project reads: the DAPO/AIME prompts ask for a last
line ``Answer: <answer>``; MATH-style prompts ask for ``\\boxed{<answer>}``. Both
extractors take the *last* occurrence, because a reasoning trace may quote or revise
earlier candidates.
"""

from __future__ import annotations

import re

__all__ = ["extract_answer_line", "last_boxed", "unwrap_command", "extract_final_answer",
           "brace_partners"]

# "Answer:", "answer :", "**Answer:**" ... (case-insensitive, like verl's minerva pattern).
_ANSWER_RE = re.compile(r"answer\s*:", re.IGNORECASE)
_BOX_COMMANDS = ("\\boxed", "\\fbox")


def extract_answer_line(text: str) -> str | None:
    """Text after the last ``Answer:`` up to the end of its line (first non-empty line).

    If that text contains a ``\\boxed{...}``, the box content wins (``Answer: $\\boxed{5}$``).
    Returns ``None`` when there is no ``Answer:`` or nothing follows it.
    """
    last = None
    for match in _ANSWER_RE.finditer(text):
        last = match
    if last is None:
        return None
    for line in text[last.end():].splitlines():
        line = line.strip()
        if line.strip("*").strip():
            boxed = last_boxed(line)
            return boxed if boxed is not None else line
    return None


def _balanced_arg(s: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at ``s[start] == '{'`` and the index after it."""
    depth = 0
    for i in range(start, len(s)):
        c = s[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return s[start + 1 : i], i + 1
    return None


def brace_partners(s: str) -> dict[int, int]:
    """Index of each ``{`` -> index of its closing ``}`` (unclosed ones are absent).

    One stack pass, so callers that look up many groups stay linear: scanning forward
    from every ``{`` of ``"\\text{" * n`` (never closed) is quadratic.
    """
    partners, stack = {}, []
    for i, c in enumerate(s):
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            partners[stack.pop()] = i
    return partners


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), brace-balanced.

    Also accepts the brace-less ``\\boxed 5`` form. Returns ``None`` if there is no box
    or its braces never close (a truncated response must not be graded on a fragment).
    """
    idx, cmd = max((text.rfind(c), c) for c in _BOX_COMMANDS)
    if idx < 0:
        return None
    j = idx + len(cmd)
    while j < len(text) and text[j] == " ":
        j += 1
    if j < len(text) and text[j] == "{":
        arg = _balanced_arg(text, j)
        return None if arg is None else arg[0].strip()
    if j > idx + len(cmd):  # "\boxed 5": up to the next whitespace or "$"
        m = re.match(r"[^\s$]+", text[j:])
        return m.group(0) if m else None
    return None


def unwrap_command(s: str, command: str, prefix: str = "") -> str:
    """Replace every ``\\command{X}`` by ``prefix + X`` (brace-balanced, nested groups kept).

    Linear time: brace partners are found in one pass, not by a scan per occurrence.
    """
    out, i, partners = [], 0, None
    while True:
        k = s.find(command, i)
        if k < 0:
            out.append(s[i:])
            return "".join(out)
        j = k + len(command)
        while j < len(s) and s[j] == " ":
            j += 1
        # Only a whole command name followed by a brace group ("\text" must not eat "\textbf").
        if j < len(s) and s[j] == "{" and not s[k + len(command) : k + len(command) + 1].isalpha():
            if partners is None:
                partners = brace_partners(s)
            end = partners.get(j)
            if end is not None:
                out.append(s[i:k])
                out.append(prefix + s[j + 1 : end])
                i = end + 1
                continue
        out.append(s[i : k + len(command)])
        i = k + len(command)


def extract_final_answer(text: str, mode: str = "auto") -> str | None:
    """Dispatch: ``"answer"`` (last Answer: line), ``"boxed"`` (last box), or ``"auto"``
    (the later of the two markers; the other one if that yields nothing)."""
    if mode == "answer":
        return extract_answer_line(text)
    if mode == "boxed":
        return last_boxed(text)
    if mode == "auto":
        # Whichever marker comes last wins: "the answer: hmm ... \boxed{5}" means 5.
        last_answer = max((m.start() for m in _ANSWER_RE.finditer(text)), default=-1)
        last_box = max(text.rfind(c) for c in _BOX_COMMANDS)
        if last_box > last_answer:
            boxed = last_boxed(text)
            if boxed is not None:
                return boxed
        return extract_answer_line(text)
    raise ValueError(f"extract_final_answer: mode must be 'auto', 'answer' or 'boxed', got {mode!r}")
