"""The chat arithmetic task for real LMs: its split, its scorer, its evaluation metrics."""

from __future__ import annotations

import random
import time

import pytest

from rpgrl.data.procedural import CHAT_DATA_SOURCE, addition_splits
from rpgrl.loop.evaluation import secondary_metrics
from rpgrl.rewards import compute_score, score_batch
from rpgrl.rewards.arith_chat import (FORMAT_BONUS, _last_number, _strict_answer,
                                      score_arith_chat)


def test_chat_split_is_disjoint_by_unordered_pair_and_sized():
    train, test = addition_splits(1, 20, test_size=128, task="arith_chat")
    assert (len(train), len(test)) == (272, 128)  # 400 ordered pairs of 1..20
    key = lambda e: frozenset(map(int, e.extra_info["raw_problem"].split("+")))  # noqa: E731
    assert not {key(e) for e in train} & {key(e) for e in test}
    e = test[0]
    a, b = map(int, e.extra_info["raw_problem"].split("+"))
    assert e.messages == [{"role": "user", "content": f"What is {a} + {b}? Reply as: Answer: <number>"}]
    assert e.ground_truth == str(a + b) and e.data_source == CHAT_DATA_SOURCE
    with pytest.raises(ValueError, match="unknown task"):
        addition_splits(1, 5, test_size=2, task="nope")


# (reply, ground truth, acc = last number right, strict_acc = "Answer: N" last line right),
# by class. Every wrong reading an RL policy could be paid for is a row with acc False.
CASES = [
    # -- the usual right and wrong answers
    ("Answer: 28", "28", True, True),
    ("answer:28.", "28", True, True),
    ("**Answer: 28**", "28", True, True),
    ("16 + 12 = 28", "28", True, False),           # the base model's usual form
    ("16 + 12 = 28.\nAnswer: 28", "28", True, True),
    ("Answer: 28\nHope this helps!", "28", True, False),  # the form asks for a last line
    ("It is 28...", "28", True, False),
    ("Answer: 27", "28", False, False),
    ("Answer: 128", "28", False, False),
    ("The answer is 28 or 29", "28", False, False),  # hedges end on the other number
    ("I don't know", "28", False, False),
    ("", "28", False, False),
    # -- thousands separators: only whole groups of three join digits into one number
    ("Answer: 1,000", "1000", True, True),
    ("Answer: 1,000,000", "1000000", True, True),
    ("The total is 12,345.", "12345", True, False),
    ("Answer: 2,8", "28", False, False),          # not one number ...
    ("Answer: 2,8", "8", False, False),           # ... nor a list that ends in 8
    ("Answer: 2,8", "2", False, False),
    ("Answer: 1,0,0,0", "1000", False, False),
    ("Answer: 12,34", "1234", False, False),
    ("Answer: 12,34", "34", False, False),
    ("Answer: 1,0000", "10000", False, False),
    ("Answer: 2, 8", "28", False, False),         # with a space it is a list: last number 8
    ("Answer: 2, 8", "8", True, False),
    # -- decimals: equal to an integer is that integer; a digit run inside one is no number
    ("Answer: 28.0", "28", True, True),
    ("Answer: 28.00", "28", True, True),
    ("Answer: 1,000.0", "1000", True, True),
    ("16 + 12 = 28.0", "28", True, False),
    ("The answer is 0.28", "28", False, False),
    ("The answer is 0.28", "0", False, False),
    ("Answer: 28.5", "28", False, False),
    ("Answer: 28.5", "5", False, False),
    ("Answer: 2.8", "8", False, False),
    ("Answer: .28", "28", False, False),
    ("Answer: 1.2.28", "28", False, False),       # a version/date, not a number
    # -- exponent forms and longer tokens are not plain numbers (and hide no number)
    ("Answer: 1e2", "2", False, False),
    ("Answer: 1e2", "1", False, False),
    ("Answer: 1e2", "100", False, False),         # the prompt asks for a plain number
    ("Answer: 2.8e1", "28", False, False),
    ("Answer: 1e-5", "5", False, False),
    ("Answer: 1e-5", "-5", False, False),
    ("Answer: 1E+28", "28", False, False),
    ("Answer: 10^28", "28", False, False),
    ("Answer: 28e0", "28", False, False),
    ("Answer: 28x", "28", False, False),
    ("Answer: x28", "28", False, False),
    ("Answer: 0x1C", "28", False, False),
    ("Answer: 28\u00b2", "28", False, False),    # 28 squared
    ("1" + "0" * 4094 + "28", "28", False, False),  # cut at MAX_CHARS: no fragment is read
    # -- a hyphen between two numbers is a range or a subtraction, never a minus sign
    ("Answer: 10-28", "-28", False, False),
    ("Answer: 10-28", "28", False, False),
    ("Answer: 10-28", "-18", False, False),       # not evaluated either
    ("Answer: 10\u201328", "-28", False, False),  # en dash
    ("Answer: 10 - 28", "-28", False, False),
    ("Answer: 10 -28", "-28", False, False),
    ("Answer: 3 - 5", "-5", False, False),
    ("Answer: 16+12", "12", False, False),
    ("16 - 12 = 4", "4", True, False),
    ("16-12=4", "4", True, False),
    # -- minus signs: ASCII, U+2212 and the other dashes people type as minus
    ("Answer: -3", "-3", True, True),
    ("Answer: -5", "-5", True, True),
    ("Answer: \u22125", "-5", True, True),        # U+2212 MINUS SIGN
    ("Answer: \u20135", "-5", True, True),        # en dash
    ("Answer: \uff0d5", "-5", True, True),        # fullwidth hyphen-minus
    ("3 - 8 = -5", "-5", True, False),
    ("3 - 8 = \u22125", "-5", True, False),
    ("The answer is -5.", "-5", True, False),
    ("The answer is (\u22125).", "-5", True, False),
    ("Answer: -5", "5", False, False),
    ("Answer: \u22125", "5", False, False),
    ("7 - 12 = \u22125", "5", False, False),
]


@pytest.mark.parametrize("reply, truth, acc, strict", CASES)
def test_scorer_table(reply, truth, acc, strict):
    r = score_arith_chat(reply, truth)
    assert (r["acc"], r["strict_acc"]) == (acc, strict)
    assert r["score"] == pytest.approx(float(acc) + (FORMAT_BONUS if strict else 0.0))
    # the data source routes to this scorer
    assert compute_score(CHAT_DATA_SOURCE, reply, truth) == r


def _pathological_replies(n: int) -> list[str]:
    """Replies of about ``n`` characters built to make a number reader backtrack."""
    rng = random.Random(0)
    k = n // 2
    return ["1" * k + "x", "1 " * k, "Answer: " * (n // 8), "-" * k + "1",
            "".join(rng.choice("0123456789 -:,.\nAnswer") for _ in range(n)),
            "1," * k, "1-" * k, ".1" * k, "1 -" * (n // 3), "\u2212" * k + "1",
            "1e-" * (n // 3), "1" + " " * n + "-5", "Answer: " + "1" * n]


def test_scorer_is_fast_on_pathological_replies():
    for reply in _pathological_replies(200_000):
        t0 = time.perf_counter()
        score_arith_chat(reply, "28")
        assert time.perf_counter() - t0 < 0.2


def test_number_scan_is_linear_without_the_length_cap():
    """The cap (MAX_CHARS) is not what keeps the reader fast: its scans are linear on their
    own (a backtracking reader takes minutes on 100k characters, this takes < 0.5 s)."""
    for reply in _pathological_replies(100_000):
        t0 = time.perf_counter()
        _last_number(reply)
        _strict_answer(reply)
        assert time.perf_counter() - t0 < 2.0


def test_evaluation_reports_strict_and_last_number_accuracy():
    replies = ["Answer: 28", "16 + 12 = 28", "Answer: 27", "no idea"]
    details: list = []
    scores, _ = score_batch([CHAT_DATA_SOURCE] * 4, replies, ["28"] * 4, details=details)
    assert scores == [1.0 + FORMAT_BONUS, 1.0, 0.0, 0.0]
    assert secondary_metrics(details) == {"strict_acc": 0.25}


def test_strict_answer_is_always_also_the_last_number():
    """The two extractions share one numeral reader: a right ``Answer: N`` line is never
    scored wrong by the last-number reading (the reward stays acc + bonus, <= 1.2)."""
    rng = random.Random(1)
    alphabet = ["Answer: ", "answer:", "-", "\u2212", "28", "2", "8", ",", ".", " ", "\n", "x",
                "e", "+", "**", "1,000", "0", "is "]
    seen_strict = 0
    for _ in range(2000):
        reply = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        if rng.random() < 0.5:  # end on a (possibly malformed) Answer: line
            tail = (rng.choice(alphabet[2:]) for _ in range(rng.randint(1, 3)))
            reply += "\nAnswer: " + "".join(tail)
        for truth in ("28", "-28", "1000", "2", "8"):
            r = score_arith_chat(reply, truth)
            assert r["acc"] or not r["strict_acc"], reply
            assert r["score"] == float(r["acc"]) + (FORMAT_BONUS if r["strict_acc"] else 0.0)
            seen_strict += r["strict_acc"]
    assert seen_strict > 100  # the property was exercised, not vacuous
