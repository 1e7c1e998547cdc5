"""The declared tests of a study plan (rpgrl.tools.hypotheses), on hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("scipy", reason="rpgrl compare's statistics need scipy (pip install -e '.[stats]')")

from rpgrl.tools.hypotheses import contrast_values, evaluate_plan, holm, declared_test  # noqa: E402
from rpgrl.tools.study_plan import load_plan  # noqa: E402


def test_paired_t_by_hand():
    c = np.array([0.02, 0.05, -0.01, 0.04, 0.03])
    r = declared_test(c, "paired_t")
    mean, sd = c.mean(), c.std(ddof=1)
    t = mean / (sd / math.sqrt(5))
    assert r["t"] == pytest.approx(t, rel=1e-12) and r["df"] == 4
    # two-sided p from the t distribution with 4 df, and the 95 % interval with t_{.975,4} = 2.7764
    from scipy import stats

    assert r["p"] == pytest.approx(2 * stats.t.sf(abs(t), 4), rel=1e-12)
    assert r["hi"] - mean == pytest.approx(2.7764 * sd / math.sqrt(5), rel=1e-4)
    # exact sign-flip permutation p: sign patterns whose |mean| >= the observed one, out of 2^5
    flips = [np.mean(c * np.array(s)) for s in np.array(np.meshgrid(*[[-1, 1]] * 5)).T.reshape(-1, 5)]
    assert r["p_permutation"] == pytest.approx(np.mean(np.abs(flips) >= abs(mean) - 1e-15), abs=1e-12)
    assert r["bootstrap_lo"] < mean < r["bootstrap_hi"]


def test_tost_by_hand():
    c = np.array([0.01, -0.02, 0.0, 0.015, -0.005, 0.01])
    margin = 0.05
    r = declared_test(c, "tost", margin=margin)
    n, mean, se = 6, c.mean(), c.std(ddof=1) / math.sqrt(6)
    from scipy import stats

    p_lower = stats.t.sf((mean + margin) / se, n - 1)  # H0: mean <= -margin
    p_upper = stats.t.cdf((mean - margin) / se, n - 1)  # H0: mean >= +margin
    assert r["p_lower"] == pytest.approx(p_lower, rel=1e-10) and r["p_upper"] == pytest.approx(p_upper, rel=1e-10)
    assert r["p"] == max(r["p_lower"], r["p_upper"]) < 0.05
    assert r["ci_level"] == pytest.approx(0.90) and -margin < r["lo"] < r["hi"] < margin
    # a contrast centred on the margin is not equivalent
    assert declared_test(c + 0.05, "tost", margin=margin)["p"] > 0.05


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04, 0.30 -> x4, x3, x2, x1 = 0.04, 0.06, 0.08, 0.30 (monotone already)
    assert holm([0.04, 0.01, 0.30, 0.02]) == pytest.approx([0.08, 0.04, 0.30, 0.06])
    # running maximum: 0.02 x 3 = 0.06, then 0.021 x 2 = 0.042 and 0.05 x 1 both rise to 0.06
    assert holm([0.05, 0.02, 0.021]) == pytest.approx([0.06, 0.06, 0.06])
    assert holm([0.6, 0.5]) == pytest.approx([1.0, 1.0])


def _run(seed, last, curve=()):
    return {"seed": seed, "last": last, "eval_curve": [[0, 0.27], *curve]}


def test_contrasts_pair_by_seed_and_skip_missing(tmp_path):
    results = {"a": [_run(0, 0.6), _run(1, 0.5), _run(2, 0.7)], "b": [_run(0, 0.5), _run(2, 0.6), _run(3, 0.1)]}
    seeds, c = contrast_values(results, {"a": 1.0, "b": -1.0}, "last")
    assert seeds == [0, 2] and c == pytest.approx([0.1, 0.1])
    seeds, c = contrast_values({"a": [_run(0, 0.6, [[2, 0.4], [4, 0.6]])], "b": [_run(0, 0.5, [[2, 0.5], [4, 0.5]])]},
                               {"a": 1, "b": -1}, "auc")
    assert seeds == [0] and c == pytest.approx([0.0])  # (0.4 + 0.6)/2 - (0.5 + 0.5)/2


def test_plan_loads_checks_and_evaluates(tmp_path):
    from rpgrl.config import ConfigError

    plan = tmp_path / "plan.yaml"
    plan.write_text("""
arms:
  a: {preset: dapo, seeds: 0-3}
  b: {preset: dapo, set: {algorithm.advantage: rpg, algorithm.dual_clip: null}, seeds: 0-3}
hypotheses:
  - {id: H1, test: paired_t, contrast: {a: 1, b: -1}}
  - {id: H2, test: tost, margin: 0.05, contrast: {a: 1, b: -1}}
  - {id: E1, test: paired_t, contrast: {a: 1, b: -1}, metric: best, confirmatory: false}
""")
    p = load_plan(plan)
    arms = {a.name: a for a in p.arm_list()}
    assert arms["b"].items == ("algorithm.preset=dapo", "algorithm.advantage=rpg", "algorithm.dual_clip=null")
    assert arms["a"].seeds == (0, 1, 2, 3)
    results = {"a": [{**_run(s, 0.5 + 0.01 * s), "best": 0.6} for s in range(4)],
               "b": [{**_run(s, 0.5), "best": 0.6} for s in range(4)]}
    out = evaluate_plan(p, results)
    assert out["family_size"] == 2
    h1, h2, e1 = out["tests"]
    assert h1["mean"] == pytest.approx(0.015) and h1["p_adjusted"] == pytest.approx(min(1, 2 * min(h1["p"], h2["p"]))
                                                                                    if h1["p"] < h2["p"] else
                                                                                    max(2 * h2["p"], h1["p"]))
    assert "p_adjusted" not in e1 and e1["note"] == "zero variance over seeds"
    # a constant contrast (every seed +0.0, as strict accuracy 0 everywhere gives) is named as such
    assert e1["outcome"] == "not testable (the contrast is +0.0 pts on every seed: zero variance)"
    for bad, msg in [("arms: {a: {preset: nope, seeds: 2}}", "unknown preset"),
                     ("arms: {a: {preset: dapo, seeds: 2}}\nhypotheses: [{id: H, test: paired_t, contrast: {a: 1, z: -1}}]",
                      "unknown arm 'z'"),
                     ("arms: {a: {preset: dapo, seeds: 2}, b: {preset: dapo, seeds: 2}}\n"
                      "hypotheses: [{id: H, test: tost, contrast: {a: 1, b: -1}}]", "margin"),
                     ("arms: {a: {preset: dapo, seeds: 2}, b: {preset: dapo, seeds: 2}}\n"
                      "hypotheses: [{id: H, test: paired_t, contrast: {a: 1, b: -0.5}}]", "sum to 0")]:
        plan.write_text(bad)
        with pytest.raises(ConfigError, match=msg):
            load_plan(plan)
