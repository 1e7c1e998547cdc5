"""Answer extraction, normalisation, equivalence, routing, safe batch scoring, shaping."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rpgrl.rewards import (
    ScorerSpecError, answers_match, compute_score, extract_answer_line, last_boxed,
    load_scorer, normalize_answer, overlong_penalty, route, safe, score_batch,
)
from rpgrl.rewards.verify import symbolic_cost

# (prediction, ground truth, expected equivalence)
EQUIVALENCE = [
    # integers, signs, formatting
    ("85", "85", True),
    ("86", "85", False),
    ("-1", "-1", True),
    ("1", "-1", False),
    ("\u22125", "-5", True),             # unicode minus
    ("- 5", "-5", True),
    ("+3", "3", True),
    ("85.", "85", True),                 # trailing period
    ("$85$", "85", True),
    ("\\$85", "85", True),               # dollar sign as currency
    ("**85**", "85", True),              # markdown bold
    ("\\textbf{85}", "85", True),
    ("\\boxed{85}", "85", True),
    ("1,000", "1000", True),             # thousands separator
    ("1{,}000", "1000", True),
    ("1,000,000", "1000000", True),
    ("1,2", "12", False),                # a list is not a thousands group
    # decimals
    ("3.0", "3", True),
    ("0.50", "0.5", True),
    (".5", "0.5", True),
    ("0.333", "\\frac{1}{3}", False),
    ("2.5", "2.05", False),
    # fractions
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac{3}{4}", "3/4", True),
    ("\\tfrac34", "\\frac{3}{4}", True),
    ("\\frac12", "1/2", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("\\frac{-1}{2}", "-1/2", True),
    ("2/4", "1/2", True),                # equal rationals
    ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ("\\frac{3}{\\sqrt{2}}", "\\frac{3\\sqrt{2}}{2}", True),
    # units, degrees, percent
    ("336^\\circ", "336", True),
    ("336^{\\circ}", "336^\\circ", True),
    ("336\u00b0", "336", True),
    ("336 degrees", "336", True),
    ("50\\%", "50", True),
    ("50%", "50", True),
    ("12 \\text{ cm}^2", "12", True),
    ("5\\text{ meters}", "5", True),
    ("7 square feet", "7", True),
    ("15 students", "15", True),
    ("85 apples", "85", True),
    ("3 or 4", "3", False),              # hedging is not an answer
    ("3 and 4", "3", False),
    ("2 pi", "2", False),                # a math word after a number is not a unit
    ("3 sqrt", "3", False),
    ("2 infinity", "2", False),
    ("5 choose 2", "5", False),
    ("7 mod 3", "7", False),
    ("2 million", "2", False),
    ("3 halves", "3", False),
    ("\\text{(B)}", "B", True),
    # "x = 3" forms
    ("x = 3", "3", True),
    ("x=-2", "-2", True),
    ("n = 4", "5", False),
    ("x = \\frac{1}{2}", "\\frac12", True),
    # sqrt, pi, expressions (math-verify fallback)
    ("2\\sqrt3", "2\\sqrt{3}", True),
    ("\\sqrt{12}", "2\\sqrt{3}", True),
    ("\\sqrt{2}", "\\sqrt{3}", False),
    ("3\\sqrt{2}/2", "\\frac{3\\sqrt{2}}{2}", True),
    ("2\\pi", "2 \\pi", True),
    ("\\pi", "3.14159", False),
    ("(x+1)^2", "x^2+2x+1", True),
    ("x^2-1", "x^2+1", False),
    # intervals, sets, tuples
    ("(1, 2]", "(1,2]", True),
    ("[1,2)", "(1,2)", False),
    ("\\left( -\\infty, 3 \\right)", "(-\\infty,3)", True),
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("(1,2)", "(2,1)", False),
    # numeric truth needs a number, not an expression (no reward hacking on arithmetic)
    ("37+48", "85", False),
    ("\\frac{170}{2}", "85", True),      # an integer fraction is a plain number
    ("85abc", "85", False),
    ("", "85", False),
    # hedges: two candidates (or an estimate) are never the answer, whatever the form
    ("x=5 or x=6", "6", False),
    ("x=5 or x=6", "5", False),
    ("x = 5, x = 6", "6", False),
    ("12 or x = 13", "13", False),       # the "or" sits left of the only "="
    ("x = 5 or 6", "6", False),
    ("5 \\text{ or } 6", "6", False),
    ("6 or 5", "6", False),
    ("either 5 or 6", "6", False),
    ("6 maybe", "6", False),
    ("6 approximately", "6", False),
    ("6 or so", "6", False),
    ("6 at most", "6", False),
    ("6 (or 5)", "6", False),
    # equations: the right-hand side is the answer only when the left side names it
    ("4 = 5", "5", False),
    ("x^2 = 4", "4", False),
    ("2x = 6", "6", False),              # says x = 3
    ("-x = 5", "5", False),              # says x = -5
    ("37+48 = 85", "85", False),         # a computation, not a named quantity
    ("2+2 = 4", "4", False),
    ("x = y = 3", "3", False),
    ("\\frac{1}{2} = 0.5", "0.5", False),
    ("\\pi = 3", "3", False),
    ("m+n = 43", "43", True),            # AIME's "find m+n"
    ("m + n = 43", "43", True),
    ("100m+n = 1234", "1234", True),
    ("AB = 5", "5", True),
    ("x_1 = 2", "2", True),
    ("\\theta = 30", "30", True),
    ("f(2) = 7", "7", True),
    ("\\text{Area} = 12", "12", True),
    ("y = 2x+3", "2x+3", True),
    ("y = 2x + 3", "y=2x+3", True),      # same rule on both sides
    ("\\angle ABC = 30^\\circ", "30", True),
    ("|z| = 5", "5", True),
    ("S_{10} = 55", "55", True),
    ("a^2+b^2 = 25", "25", False),       # a computation on the left, like x^2 = 4
    # a bare brace group is its content; the set \\{5\\} is not a number
    ("{5}", "5", True),
    ("{{5}}", "5", True),
    ("{-5}", "-5", True),
    ("{5}", "6", False),
    ("{1,000}", "1000", True),
    ("{\\frac{1}{2}}", "0.5", True),
    ("\\{5\\}", "5", False),
    # powers of ten and scientific notation are numerals; other powers are computations
    ("10^3", "1000", True),
    ("10^{3}", "1000", True),
    ("{10}^{3}", "1000", True),
    ("-10^{2}", "-100", True),
    ("10^{-2}", "0.01", True),
    ("1.5 \\times 10^{3}", "1500", True),
    ("1.5\u00d710^3", "1500", True),
    ("2 \\cdot 10^2", "200", True),
    ("1000", "10^{3}", True),            # on the ground-truth side too
    ("10^3", "100", False),
    ("1.5 \\times 10^{3}", "150", False),
    ("2^{10}", "1024", False),
    ("\\sqrt{4}", "2", False),
    ("5 \\cdot 200", "1000", False),
    ("10 \\times 100", "1000", False),
    ("10^2 \\cdot 10", "1000", False),
    ("85+0", "85", False),
    # equivalent numeric forms
    ("1000.0", "1000", True),
    ("+1000", "1000", True),
    ("1\\,000", "1000", True),
    ("1 000", "1000", True),
    ("-0", "0", True),
    ("-.5", "-1/2", True),
    ("\\frac{3}{6}", "0.5", True),
    ("5/10", "\\frac12", True),
    ("170/2", "85", True),
    ("0.5", "1/3", False),
    # long numerals compare exactly (Decimal's 28-digit default context used to round)
    ("1111111111111111111111111111112", "1111111111111111111111111111111", False),
    ("0.10000000000000000000000000000001", "0.1", False),
    ("12345678901234567890123456789012345", "12345678901234567890123456789012345", True),
    ("12345678901234567890123456789012345.0", "12345678901234567890123456789012345", True),
]


@pytest.mark.parametrize("pred,gt,expected", EQUIVALENCE)
def test_equivalence_table(pred: str, gt: str, expected: bool) -> None:
    ok, _ = answers_match(pred, gt)
    assert ok is expected, (pred, gt, normalize_answer(pred), normalize_answer(gt))


@pytest.mark.parametrize("pred,gt,expected", EQUIVALENCE)
def test_equivalence_through_compute_score(pred: str, gt: str, expected: bool) -> None:
    out = compute_score("math_dapo", f"Some reasoning.\nAnswer: {pred}", gt)
    assert set(out) == {"score", "acc", "pred"}
    assert out["score"] == (1.0 if expected else 0.0) and out["acc"] is expected


@pytest.mark.parametrize("text,expected", [
    ("Answer: 5", "5"),
    ("Answer:85", "85"),
    ("answer : 7\nmore text", "7"),
    ("Answer: 3\n... wait, redo.\nAnswer: 4", "4"),             # the LAST Answer: wins
    ("**Answer:** 12", "** 12"),
    ("Answer:\n\n42\n", "42"),
    ("Final Answer: The final answer is $\\boxed{9}$.", "9"),
    ("no marker here", None),
    ("Answer:   \n", None),
])
def test_extract_answer_line(text: str, expected: str | None) -> None:
    assert extract_answer_line(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{5}", "5"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),     # last, nested braces
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed 7 done", "7"),
    ("\\fbox{3}", "3"),
    ("\\boxed{\\frac{1}{2}", None),                                 # unbalanced: truncated
    ("nothing", None),
])
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


def test_default_scorer_uses_boxed_without_answer_line_and_answer_line_first() -> None:
    assert compute_score("lighteval/MATH", "thus \\boxed{\\dfrac{1}{2}}", "\\frac12")["score"] == 1.0
    # Answer: takes precedence over an earlier box
    assert compute_score("aime2024", "\\boxed{3}\nAnswer: 4", "4")["score"] == 1.0
    assert compute_score("aime2024", "\\boxed{4}\nAnswer: 3", "4")["score"] == 0.0
    # the later marker wins
    assert compute_score("math_dapo", "The answer: hmm, compute.\nSo \\boxed{4}", "4")["score"] == 1.0
    assert compute_score("math_dapo", "Answer: 4\n\\boxed{", "4")["score"] == 1.0  # broken box
    assert compute_score("amc_23", "", "4") == {"score": 0.0, "acc": False, "pred": None}
    assert compute_score("amc_23", "I give up", "4")["pred"] is None


def test_routing_table() -> None:
    for ds in ("math_dapo", "aime2025", "aime-2024", "amc_23", "rpgrl/arith", "never-seen"):
        assert route(ds) == "default"


def test_arith_task_responses() -> None:
    rs = ["Answer:85", "Answer: 85", "Answer:58", "Answer:8", "Answer:", "A:85", "Answer:37+48"]
    rewards, stats = score_batch(["rpgrl/arith"] * len(rs), rs, ["85"] * len(rs))
    assert rewards == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert stats["scorer_errors"] == stats["scorer_timeouts"] == stats["scorer_bad_return"] == 0


def test_fast_path_speed_256_short_responses() -> None:
    rs = [f"Answer:{i % 199}" if i % 2 else f"Answer: {i % 199}" for i in range(256)]
    gts = [str((i * 7) % 199) for i in range(256)]
    score_batch(["rpgrl/arith"] * 256, rs, gts)  # warm caches of the regex engine
    t0 = time.perf_counter()
    rewards, _ = score_batch(["rpgrl/arith"] * 256, rs, gts)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.05, f"256 short responses took {elapsed * 1e3:.1f} ms"
    assert rewards == [float(r == f"Answer:{g}" or r == f"Answer: {g}") for r, g in zip(rs, gts, strict=True)]


# ---- every scorer path is linear-time or capped ------------------------------------
# The built-in scorers run in-process (verl calls compute_score directly), so one response
# must never stall training: each call below must finish far inside a second.

_SCORERS = {name: load_scorer(name) for name in ("default", "dapo", "boxed", "math_verify")}
_MAX_CALL_S = 0.5


def _slowest_call(response: str, truths=("5", "x^2+1")) -> tuple[float, str]:
    slowest = (0.0, "")
    for name, fn in _SCORERS.items():
        for gt in truths:
            t0 = time.perf_counter()
            out = fn("math_dapo", response, gt)
            elapsed = time.perf_counter() - t0
            assert out["score"] in (0.0, 1.0)
            slowest = max(slowest, (elapsed, f"{name} vs {gt!r}"))
    return slowest


@pytest.fixture(scope="module", autouse=False)
def warm_scorers():
    _slowest_call("Answer: \\sqrt{2}\n\\boxed{x+1}")  # lazy imports: sympy, math-verify


@pytest.mark.parametrize("response", [
    "Answer: " + "1" * 8000 + "x",         # was 0.8 s (quadratic _DECIMAL)
    "Answer: " + "1" * 30000 + "x",        # 7.9 s
    "Answer: " + "1 " * 50000 + "x",       # 22.6 s
    "Answer: " + "\\text{" * 20000,        # a brace scan from every unclosed \text{
    "\\boxed{" + "\\text{" * 20000 + "}",
    "Answer: " + "1." * 20000 + "x",
    "Answer: x = " + "1" * 30000 + "x",
    "Answer: " + "\\frac{" * 10000 + "1",
], ids=lambda r: f"{r[:14]!r}..{len(r)}")
def test_long_pathological_responses_score_fast(warm_scorers, response: str) -> None:
    elapsed, where = _slowest_call(response)
    assert elapsed < _MAX_CALL_S, f"{where}: {elapsed:.2f} s on a {len(response)}-char response"


@pytest.mark.parametrize("answer", [
    "1" * 30000 + "x", "1 " * 20000 + "x", "1." * 20000 + "x", "\\text{" * 3000,
    "\\boxed{" * 3000 + "1", "\\mathrm{" * 3000 + "}", "x = " + "1" * 30000 + "x",
    "{" * 30000 + "1", "10^{" + "1" * 30000,
    "1.5\\times" + "1" * 30000 + "x",
], ids=lambda a: f"{a[:10]!r}..{len(a)}")
def test_normalize_is_linear_even_past_the_answer_cap(answer: str) -> None:
    """The regexes and brace scans themselves, not only the MAX_ANSWER_CHARS cap in front."""
    t0 = time.perf_counter()
    normalize_answer(answer)
    elapsed = time.perf_counter() - t0
    assert elapsed < _MAX_CALL_S, f"{elapsed:.2f} s on a {len(answer)}-char answer"


@pytest.mark.parametrize("pred", [
    "9^{9^{9^{9}}}", "10^{10^{10}}", "2^{100000000}", "(x+1)^{999}", "100000000!",
    "(10^{5})!", "\\binom{1000000}{500000}", "(" * 20 + "x" + ")" * 20, "[" * 12 + "x" + "]" * 12,
    "\\sum_{k=1}^{10^{9}} k", "x" * 400,
])
def test_costly_predictions_never_reach_sympy(warm_scorers, pred: str) -> None:
    """Short answers that make math-verify/sympy run to their timeout (5 s each before)."""
    assert symbolic_cost(normalize_answer(pred)) is not None
    elapsed, where = _slowest_call(f"Answer: {pred}", truths=("\\sqrt{2}", "x^2+1"))
    assert elapsed < _MAX_CALL_S, f"{where}: {elapsed:.2f} s on {pred!r}"
    elapsed, where = _slowest_call(f"The final answer is ${pred}$.", truths=("\\sqrt{2}",))
    assert elapsed < _MAX_CALL_S, f"{where}: {elapsed:.2f} s on {pred!r}"


@pytest.mark.parametrize("pred", [
    "\\frac{3\\sqrt{2}}{2}", "(x+1)^2", "e^{x^2}", "(-\\infty,3)", "\\{1,2\\}", "n!", "5!", "2^{10}",
    "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\frac{1}{\\sqrt{\\frac{a}{b}}}", "x^{99}",
])
def test_real_answers_still_reach_sympy(pred: str) -> None:
    assert symbolic_cost(normalize_answer(pred)) is None


_PIECES = ["1", "9", " ", ".", ",", "/", "-", "+", "=", "^", "{", "}", "(", ")", "[", "]", "!",
           "x", "a", "$", "\n", "\\", "\\frac", "\\text{", "\\boxed{", "\\sqrt", "\\left(",
           "Answer:", " or ", "10^{", "\\times", " cm", "\\,", "**"]


@st.composite
def long_responses(draw) -> str:
    """A repeated unit (the shape of every catastrophic-backtracking input) with random
    text around it, or plain random text; then a marker so every extractor reads it."""
    if draw(st.booleans()):
        unit = "".join(draw(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=3)))
        body = unit * draw(st.integers(200, 40000 // len(unit)))
    else:
        body = "".join(draw(st.lists(st.sampled_from(_PIECES), min_size=500, max_size=3000)))
    head = draw(st.sampled_from(["", "Answer: ", "\\boxed{", "The final answer is $", "Answer: x = "]))
    tail = "".join(draw(st.lists(st.sampled_from(_PIECES), max_size=5)))
    return head + body + tail


@settings(max_examples=40, deadline=None, derandomize=True)
@given(response=long_responses())
def test_random_long_responses_score_fast(warm_scorers, response: str) -> None:
    elapsed, where = _slowest_call(response)
    assert elapsed < _MAX_CALL_S, f"{where}: {elapsed:.2f} s on {response[:60]!r}... ({len(response)} chars)"


# ---- user scorers and safe batch scoring -------------------------------------------

def sleeps_forever(data_source, solution_str, ground_truth, extra_info=None):
    if solution_str == "sleep":
        while True:
            time.sleep(0.05)
    return 1.0


def raises(data_source, solution_str, ground_truth, extra_info=None):
    if solution_str == "boom":
        raise RuntimeError("scorer exploded")
    return {"score": 0.5, "acc": False}


def returns_junk(data_source, solution_str, ground_truth, extra_info=None):
    return {"abc": "abc", "nan": float("nan"), "dict": {"score": "x"}, "ok": True,
            "int": 2}[solution_str]


def test_sleeping_scorer_is_cut_at_timeout(caplog) -> None:
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="rpgrl.rewards.safe"):
        rewards, stats = score_batch(["src_a", "src_b", "src_c"], ["fine", "sleep", "fine"],
                                     ["1"] * 3, scorer=sleeps_forever, timeout_s=1.0)
    elapsed = time.perf_counter() - t0
    assert rewards == [1.0, 0.0, 1.0]  # the worker restarts after the kill
    assert stats["scorer_timeouts"] == 1 and stats["scorer_errors"] == 0
    assert elapsed < 5.0
    assert "timeout" in caplog.text and "src_b" in caplog.text


def test_raising_scorer_gives_zero_and_a_count(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="rpgrl.rewards.safe"):
        rewards, stats = score_batch(["s1", "s2"], ["boom", "ok"], ["1", "1"], scorer=raises, timeout_s=5.0)
    assert rewards == [0.0, 0.5]
    assert stats["scorer_errors"] == 1 and stats["scorer_timeouts"] == 0
    assert "scorer exploded" in caplog.text and "'s1'" in caplog.text


def test_bad_return_values_give_zero_and_a_count() -> None:
    rs = ["abc", "nan", "dict", "ok", "int"]
    rewards, stats = score_batch(["s"] * 5, rs, ["1"] * 5, scorer=returns_junk, timeout_s=5.0)
    assert rewards == [0.0, 0.0, 0.0, 1.0, 2.0]
    assert stats["scorer_bad_return"] == 3


def _exits_before_ready(scorer, conn, inherited=None) -> None:
    os._exit(1)  # like a scorer module whose import calls os._exit(1) in a spawned worker


def _never_ready(scorer, conn, inherited=None) -> None:
    time.sleep(30)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd") or safe._START_METHOD != "fork",
                    reason="needs fork and /proc")
@pytest.mark.parametrize("target,start_timeout,what", [
    (_exits_before_ready, 60.0, "died during start-up"),
    (_never_ready, 0.3, "did not report ready"),
])
def test_worker_start_failure_scores_zero_and_leaks_nothing(
        monkeypatch, caplog, target, start_timeout, what) -> None:
    monkeypatch.setattr(safe, "_worker_main", target)
    monkeypatch.setattr(safe, "_START_TIMEOUT_S", start_timeout)

    def scorer(data_source, solution_str, ground_truth, extra_info=None):
        return 1.0

    fds, children = _open_fds(), set(mp.active_children())
    with caplog.at_level(logging.WARNING, logger="rpgrl.rewards.safe"):
        rewards, stats = score_batch(["s"] * 2, ["a", "b"], ["1"] * 2, scorer=scorer, timeout_s=5.0)
    assert rewards == [0.0, 0.0]
    assert stats["scorer_errors"] == 2 and stats["scorer_timeouts"] == 0
    assert _open_fds() == fds  # the parent end of the pipe was closed
    assert set(mp.active_children()) <= children  # every failed start was killed
    assert what in caplog.text
    safe.close_workers()


def test_empty_responses_score_zero_without_calling() -> None:
    rewards, stats = score_batch(["s", "s"], ["", "boom"], ["1", "1"], scorer=raises, timeout_s=5.0)
    assert rewards == [0.0, 0.0]
    assert stats["empty_responses"] == 1 and stats["scorer_errors"] == 1


def test_mismatched_lengths_are_rejected() -> None:
    with pytest.raises(ValueError, match="responses=2"):
        score_batch(["s"], ["a", "b"], ["1"])


def test_builtin_off_main_thread_runs_in_worker() -> None:
    import threading

    box = {}
    t = threading.Thread(target=lambda: box.update(out=score_batch(
        ["aime2024", "amc_23"], ["Answer: $\\sqrt{12}$", "Answer: 3"], ["2\\sqrt{3}", "4"])))
    t.start()
    t.join(30)
    rewards, stats = box["out"]
    assert rewards == [1.0, 0.0] and stats["scorer_errors"] == 0


def test_load_scorer_specs(tmp_path) -> None:
    f = tmp_path / "my_scorer.py"
    f.write_text("import time\nX = 3\n"
                 "def score(data_source, solution_str, ground_truth, extra_info=None):\n"
                 "    if solution_str == 'hang':\n        time.sleep(1000)\n"
                 "    return float(solution_str == ground_truth)\n")
    fn = load_scorer(f"{f}:score")
    assert fn("d", "7", "7") == 1.0 and fn("d", "7", "8") == 0.0
    rewards, stats = score_batch(["d"] * 3, ["7", "hang", "8"], ["7", "7", "8"], scorer=fn, timeout_s=1.0)
    assert rewards == [1.0, 0.0, 1.0] and stats["scorer_timeouts"] == 1
    assert load_scorer("rpgrl.rewards:compute_score")("aime2025", "Answer: 4", "4")["score"] == 1.0
    assert load_scorer("boxed")("x", "\\boxed{2}", "2")["score"] == 1.0
    cases = [
        (f"{f}:nope", "has no attribute 'nope'"),
        (f"{f}:X", "not callable"),
        (f"{tmp_path}/missing.py:score", "does not exist"),
        ("no_such_module_xyz:score", "cannot import module 'no_such_module_xyz'"),
        ("just_a_name", "expected 'module:function'"),
    ]
    for spec, text in cases:
        with pytest.raises(ScorerSpecError, match=text) as ei:
            load_scorer(spec)
        assert spec in str(ei.value)


# ---- overlong shaping (docs/math.md §7) -------------------------------------

def test_overlong_penalty_hand_computed() -> None:
    # Lmax = 20, Lb = 4: free up to 16, linear to -factor at 20.
    pen = overlong_penalty([0, 16, 17, 18, 20, 22], max_len=20, buffer_len=4, penalty_factor=1.0)
    assert torch.equal(pen, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.5]))
    pen2 = overlong_penalty(torch.tensor([18]), max_len=20, buffer_len=4, penalty_factor=0.5,
                            dtype=torch.float64)
    assert pen2.dtype == torch.float64 and pen2.item() == -0.25
    assert torch.equal(overlong_penalty([25], 20, 0), torch.zeros(1))  # buffer 0: off
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty([1], 20, 30)


def test_scorer_worker_exits_when_its_parent_is_killed(tmp_path):
    """A run killed by SIGKILL must not leave its scorer worker behind (it used to hold its own
    copy of the parent's pipe end, so it never saw EOF and lived on, re-parented to PID 1)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "run.py"
    script.write_text(
        "import os, sys, time\n"
        "from rpgrl.rewards.safe import _worker_for\n"
        "from rpgrl.rewards import load_scorer\n"
        "w = _worker_for(load_scorer('rpgrl.rewards.router:compute_score'))\n"
        "assert w.call(dict(data_source='x', solution_str='Answer: 1', ground_truth='1', extra_info=None), 30)[0] == 'ok'\n"
        "print(w.proc.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{worker}/stat") as f:  # a zombie already exited
            if f.read().split(")")[-1].split()[0] == "Z":
                return
        time.sleep(0.1)
    os.kill(worker, signal.SIGKILL)
    raise AssertionError("the scorer worker outlived its killed parent")
