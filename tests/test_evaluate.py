"""Mean@k, unbiased pass@k, per-source summaries and last/best tracking."""

from __future__ import annotations

import itertools
import json
from math import comb

import pytest

from rpgrl.loop.eval_metrics import BestLastTracker, flatten, format_table, pass_at_k, pass_ks, summarize


@pytest.mark.parametrize("n,c,k,expected", [
    (4, 1, 2, 0.5),          # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (4, 0, 2, 0.0),
    (4, 3, 2, 1.0),          # n - c = 1 < k
    (4, 4, 4, 1.0),
    (5, 2, 1, 0.4),          # pass@1 = c/n
    (10, 3, 3, 1 - 35 / 120),
    (32, 1, 32, 1.0),
    (32, 0, 1, 0.0),
])
def test_pass_at_k_hand_computed(n, c, k, expected) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomial_form_everywhere() -> None:
    for n in range(1, 21):
        for c, k in itertools.product(range(n + 1), range(1, n + 1)):
            exact = 1 - comb(n - c, k) / comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)
    # large n stays finite where C(n, k) would overflow a float
    assert pass_at_k(2000, 10, 1000) == pytest.approx(1 - comb(1990, 1000) / comb(2000, 1000), abs=1e-12)


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_bad_arguments(n, c, k) -> None:
    with pytest.raises(ValueError, match=f"n={n}, c={c}, k={k}"):
        pass_at_k(n, c, k)


def test_pass_ks() -> None:
    assert pass_ks(1) == [1]
    assert pass_ks(32) == [1, 2, 4, 8, 16, 32]
    assert pass_ks(6) == [1, 2, 4, 6]


def _records(source: str, correct_per_problem: list[list[int]]) -> list[dict]:
    return [{"data_source": source, "uid": f"{source}/{p}", "acc": bool(a)}
            for p, accs in enumerate(correct_per_problem) for a in accs]


def test_summarize_hand_computed() -> None:
    # source A: 2 problems x 4 samples, c = 1 and 4; source B: 1 problem, c = 0 (uses "score")
    recs = _records("A", [[1, 0, 0, 0], [1, 1, 1, 1]])
    recs += [{"data_source": "B", "uid": "B/0", "score": 0.0} for _ in range(4)]
    s = summarize(recs, k=4)
    a, b, o = s["by_source"]["A"], s["by_source"]["B"], s["overall"]
    assert a == {"mean@4": 5 / 8, "pass@1": (0.25 + 1) / 2, "pass@2": (0.5 + 1) / 2,
                 "pass@4": 1.0, "n_problems": 2, "n_samples": 8}
    assert b == {"mean@4": 0.0, "pass@1": 0.0, "pass@2": 0.0, "pass@4": 0.0,
                 "n_problems": 1, "n_samples": 4}
    assert o["mean@4"] == 5 / 12 and o["pass@2"] == pytest.approx(1.5 / 3)
    assert o["pass@4"] == pytest.approx(2 / 3) and o["n_problems"] == 3
    flat = flatten(s)
    assert flat["A/pass@2"] == 0.75 and flat["overall/n_samples"] == 12
    table = format_table(s)
    assert "| A | 2 | 0.625 | 0.625 | 0.750 | 1.000 |" in table
    assert table.splitlines()[-1].startswith("| overall | 3 | 0.417")


def test_summarize_rejects_too_few_samples() -> None:
    with pytest.raises(ValueError, match="'A/0' of 'A' has 2 samples, fewer than k=4"):
        summarize(_records("A", [[1, 0]]), k=4)


def test_best_last_tracker_round_trip(tmp_path) -> None:
    t = BestLastTracker(lower_is_better=["A/loss"])
    t.update(10, {"A/mean@4": 0.5, "A/loss": 2.0, "A/n_problems": 30})
    t.update(20, {"A/mean@4": 0.7, "A/loss": 3.0, "A/n_problems": 30})
    t.update(30, {"A/mean@4": 0.6, "A/loss": 1.0, "A/n_problems": 30})
    assert t.last == {"A/mean@4": 0.6, "A/loss": 1.0, "A/n_problems": 30.0} and t.last_step == 30
    assert t.best == {"A/mean@4": {"value": 0.7, "step": 20}, "A/loss": {"value": 1.0, "step": 30}}
    path = tmp_path / "best_last.json"
    t.save(path)
    assert json.loads(path.read_text())["best"]["A/mean@4"] == {"value": 0.7, "step": 20}
    u = BestLastTracker.load(path)
    assert u.to_dict() == t.to_dict()
    u.update(40, {"A/loss": 0.5})
    assert u.best["A/loss"] == {"value": 0.5, "step": 40}
