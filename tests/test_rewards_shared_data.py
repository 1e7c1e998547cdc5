"""The scorer against the real AIME24 / AIME25 / AMC23 Mean@32 files (docs/math.md §9)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from rpgrl.data.verl import load_examples
from rpgrl.rewards import as_rational, compute_score, normalize_answer, score_batch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = {"aime-2024.parquet": (960, 30), "aime25.parquet": (960, 30), "amc-23.parquet": (1280, 40)}

pytestmark = pytest.mark.skipif(not all((DATA / f).is_file() for f in FILES),
                                reason=f"shared eval data not found in {DATA}")


@pytest.fixture(scope="module")
def problems():
    out = {}
    for name, (rows, n_problems) in FILES.items():
        examples, stats = load_examples([DATA / name])
        assert stats["rows"] == stats["loaded"] == rows and stats["skipped"] == 0
        assert stats["problems"] == n_problems
        distinct = {}
        for ex in examples:
            distinct.setdefault(ex.uid, ex)
        out[name] = list(distinct.values())
    return out


def _wrong(gt: str) -> str:
    value = as_rational(normalize_answer(gt))
    assert value is not None, f"expected numeric ground truths, got {gt!r}"
    return str(value + 1) if value.denominator == 1 else str(value + Fraction(1, 2))


@pytest.mark.parametrize("name", sorted(FILES))
def test_every_problem_accepts_its_answer_and_rejects_a_wrong_one(problems, name) -> None:
    for ex in problems[name]:
        gt, ds = ex.ground_truth, ex.data_source
        for response in (f"Let me think.\nAnswer: {gt}", f"Answer: ${gt}$", f"So \\boxed{{{gt}}}."):
            out = compute_score(ds, response, gt, ex.extra_info)
            assert out["score"] == 1.0 and out["acc"] is True, (name, gt, response, out)
        wrong = _wrong(gt)
        for response in (f"Answer: {wrong}", f"\\boxed{{{wrong}}}"):
            assert compute_score(ds, response, gt)["score"] == 0.0, (name, gt, response)


def test_batch_over_all_rows(problems) -> None:
    exs = [ex for name in sorted(FILES) for ex in problems[name]]
    responses = [f"Answer: {ex.ground_truth}" if i % 2 else f"Answer: {_wrong(ex.ground_truth)}"
                 for i, ex in enumerate(exs)]
    rewards, stats = score_batch([e.data_source for e in exs], responses, [e.ground_truth for e in exs])
    assert rewards == [float(i % 2) for i in range(len(exs))]
    assert stats["scorer_errors"] == stats["scorer_timeouts"] == stats["scorer_bad_return"] == 0
