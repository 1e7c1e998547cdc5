"""The chat arithmetic task for real LMs: its split, its scorer, its evaluation metrics."""

from __future__ import annotations

import random
import time

import pytest

from rpgrl.data.procedural import CHAT_DATA_SOURCE, addition_splits
from rpgrl.evaluation import secondary_metrics
from rpgrl.rewards import compute_score, score_batch
from rpgrl.rewards.arith_chat import FORMAT_BONUS, score_arith_chat


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


# (reply, ground truth, acc = last number right, strict_acc = "Answer: N" last line right)
CASES = [
    ("Answer: 28", "28", True, True),
    ("answer:28.", "28", True, True),
    ("**Answer: 28**", "28", True, True),
    ("16 + 12 = 28", "28", True, False),           # the base model's usual form
    ("16 + 12 = 28.\nAnswer: 28", "28", True, True),
    ("Answer: 28\nHope this helps!", "28", True, False),  # the form asks for a last line
    ("Answer: 27", "28", False, False),
    ("The answer is 28 or 29", "28", False, False),  # hedges end on the other number
    ("Answer: 1,000", "1000", True, True),
    ("Answer: -3", "-3", True, True),
    ("I don't know", "28", False, False),
    ("", "28", False, False),
]


@pytest.mark.parametrize("reply, truth, acc, strict", CASES)
def test_scorer_table(reply, truth, acc, strict):
    r = score_arith_chat(reply, truth)
    assert (r["acc"], r["strict_acc"]) == (acc, strict)
    assert r["score"] == pytest.approx(float(acc) + (FORMAT_BONUS if strict else 0.0))
    # the data source routes to this scorer
    assert compute_score(CHAT_DATA_SOURCE, reply, truth) == r


def test_scorer_is_fast_on_pathological_replies():
    rng = random.Random(0)
    replies = ["1" * 100_000 + "x", "1 " * 100_000, "Answer: " * 20_000, "-" * 100_000 + "1",
               "".join(rng.choice("0123456789 -:,.\nAnswer") for _ in range(200_000))]
    for reply in replies:
        t0 = time.perf_counter()
        score_arith_chat(reply, "28")
        assert time.perf_counter() - t0 < 0.2


def test_evaluation_reports_strict_and_last_number_accuracy():
    replies = ["Answer: 28", "16 + 12 = 28", "Answer: 27", "no idea"]
    details: list = []
    scores, _ = score_batch([CHAT_DATA_SOURCE] * 4, replies, ["28"] * 4, details=details)
    assert scores == [1.0 + FORMAT_BONUS, 1.0, 0.0, 0.0]
    assert secondary_metrics(details) == {"strict_acc": 0.25}
