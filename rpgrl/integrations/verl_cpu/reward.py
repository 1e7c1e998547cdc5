"""Toy reward for the CPU smoke run (verl ``reward.custom_reward_function``), also the tests' scorer.

A randomly initialised model never solves arithmetic, so an exact-match reward would be 0
for every sample, every RPG group advantage (docs/math.md §5: A = R - group mean) would be 0
and the loss would carry no signal. A dense reward that only *usually* differs within a group
is not enough either: which samples are drawn depends on the CPU's kernels (AVX2 and AVX-512
machines draw differently from the same seed), so "usually" fails on some machine. (This
reward was the share of response characters equal to the answer's first digit; on one
machine all eight responses of a step lacked that digit and every score was 0.)

Here the score is a rank of the response's first :data:`PREFIX_TOKENS` tokens (the tiny
tokenizer's: ``Answer:`` or one character), read as digits in base 25 (0 = the response
ended earlier; the ground truth's first character is the highest digit). So two responses
get the same score only if they agree on those tokens: a group whose scores are all equal
holds four responses with one common prefix, which a model that spreads its probability
draws rarely: 2e-6 to 1.5e-4 per group for this run's random model, ~4e-5 for the tests'
30-step warm start (estimated from 2,000 samples per prompt; tests/test_verl_e2e.py explains the checks).

The score is ``code / 2**19`` with an integer ``code < 25**4 < 2**19``: exact in float32 (verl's
and rpgrl's reward tensors), and so are sums of a group's scores, so equal scores give an
advantage of exactly 0 and different ones a non-zero one.
"""

from __future__ import annotations

import re
from typing import Any

from rpgrl.models.tiny import ANSWER_TOKEN, CHARACTERS

#: How many leading tokens the score ranks (25**4 codes fit float32's 24-bit significand with room for sums of 4).
PREFIX_TOKENS = 4
ALPHABET = (ANSWER_TOKEN, *CHARACTERS)
BASE = len(ALPHABET) + 1
SCALE = 2.0 ** 19
_TOKEN = re.compile(f"{re.escape(ANSWER_TOKEN)}|.", re.DOTALL)
assert BASE ** PREFIX_TOKENS < SCALE


def prefix_code(text: str, target: str) -> int:
    """The integer rank of ``text``'s first tokens; ``target`` (one character) is the top digit."""
    order = [t for t in ALPHABET if t != target] + ([target] if target in ALPHABET else [])
    digit = {t: i + 1 for i, t in enumerate(order)}
    code = 0
    tokens = _TOKEN.findall(text)[:PREFIX_TOKENS]
    for tok in tokens:
        if tok not in digit:
            raise ValueError(f"toy reward: response token {tok!r} (in {text!r}) is not in the tiny tokenizer's "
                             f"vocabulary {ALPHABET}")
        code = code * BASE + digit[tok]
    return code * BASE ** (PREFIX_TOKENS - len(tokens))


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: Any = None, **_: Any) -> float:
    return prefix_code(solution_str or "", str(ground_truth)[:1]) / SCALE
