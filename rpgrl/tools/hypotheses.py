"""The declared tests of a study plan (``rpgrl.tools.study_plan``), computed with scipy.stats.

Each hypothesis is a per-seed contrast c_s = sum_arm coef_arm * metric(arm, seed) over the seeds
that every arm of the contrast ran (paired: seed s of every arm starts from the same policy and
draws the same first batch). Then:

* ``paired_t``: two-sided one-sample t-test of mean(c) = 0 (``scipy.stats.ttest_1samp``: the paired
  t-test when the contrast is a difference of two arms), with the 95 % t-interval of the mean;
* ``tost``: equivalence within +-margin by two one-sided t-tests (Schuirmann's TOST): p = the
  larger of the two one-sided p-values, and the 90 % t-interval (equivalence holds iff it lies
  inside +-margin, at alpha = 0.05).

The confirmatory p-values share one Holm correction (declared in the plan); the decision of each
test uses its adjusted p. Beside each declared test, two checks that do not assume normality:
the exact sign-flip permutation p-value of the mean (``scipy.stats.permutation_test``; all 2^n sign
patterns for n <= 12 seeds) and a bootstrap 95 % interval of the mean (``scipy.stats.bootstrap``,
BCa, a fixed random state). Holm's step-down adjustment is the one piece written here (scipy.stats
has no Holm; ``scipy.stats.false_discovery_control`` is Benjamini-Hochberg, a weaker guarantee).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["contrast_values", "evaluate_plan", "holm", "declared_test"]


def _scipy_stats():
    try:
        from scipy import stats
    except ImportError as exc:  # pragma: no cover - the test extra installs scipy
        raise ImportError("rpgrl compare's statistics use scipy.stats: pip install scipy "
                          "(or pip install -e '.[stats]' in the rpgrl clone)") from exc
    return stats


def auc(run: dict) -> float:
    """Mean held-out accuracy over the run's evaluations after step 0 (area under its curve)."""
    vals = [v for s, v in run.get("eval_curve") or [] if s > 0 and isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan


def _metric(run: dict, metric: str) -> float:
    v = auc(run) if metric == "auc" else run.get(metric)
    return float(v) if isinstance(v, (int, float)) else math.nan


def contrast_values(results: dict[str, list[dict]], contrast: dict[str, float],
                    metric: str) -> tuple[list[int], np.ndarray]:
    """(seeds, c_s) over the seeds every arm of ``contrast`` has a finite ``metric`` for."""
    per = {arm: {int(r["seed"]): _metric(r, metric) for r in results.get(arm, [])} for arm in contrast}
    seeds = sorted(set.intersection(*(set(s for s, v in p.items() if math.isfinite(v)) for p in per.values())))
    return seeds, np.array([sum(coef * per[arm][s] for arm, coef in contrast.items()) for s in seeds], dtype=float)


def declared_test(c: np.ndarray, test: str, *, margin: float | None = None, alpha: float = 0.05) -> dict[str, Any]:
    """The declared test of one contrast (module docstring), before any multiplicity correction."""
    stats = _scipy_stats()
    n = int(c.size)
    out: dict[str, Any] = {"n": n, "mean": float(np.mean(c)) if n else math.nan,
                           "std": float(np.std(c, ddof=1)) if n > 1 else math.nan}
    if n < 2:
        return {**out, "p": math.nan, "lo": math.nan, "hi": math.nan, "ci_level": math.nan}
    se = out["std"] / math.sqrt(n)
    if test == "paired_t":
        res = stats.ttest_1samp(c, 0.0)
        level = 1 - alpha
        half = stats.t.ppf(1 - alpha / 2, n - 1) * se
        out.update(t=float(res.statistic), p=float(res.pvalue), df=n - 1)
    elif test == "tost":
        lower = stats.ttest_1samp(c, -margin, alternative="greater")
        upper = stats.ttest_1samp(c, margin, alternative="less")
        level = 1 - 2 * alpha
        half = stats.t.ppf(1 - alpha, n - 1) * se
        out.update(t_lower=float(lower.statistic), t_upper=float(upper.statistic), p_lower=float(lower.pvalue),
                   p_upper=float(upper.pvalue), p=float(max(lower.pvalue, upper.pvalue)), df=n - 1, margin=margin)
    else:
        raise ValueError(f"unknown test {test!r}")
    out.update(lo=out["mean"] - half, hi=out["mean"] + half, ci_level=level)
    if se == 0:  # every seed gave the same contrast: the t statistic is undefined
        out["note"] = "zero variance over seeds"
    # robustness: exact sign-flip permutation test of the mean, and a bootstrap interval
    perm = stats.permutation_test((c,), np.mean, permutation_type="samples", n_resamples=np.inf if n <= 12 else 9999,
                                  alternative="two-sided", random_state=0)
    out["p_permutation"] = float(perm.pvalue)
    if np.ptp(c) > 0:
        boot = stats.bootstrap((c,), np.mean, confidence_level=0.95, method="BCa", random_state=0, n_resamples=9999)
        out["bootstrap_lo"], out["bootstrap_hi"] = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
    return out


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control, any dependence): sort
    ascending, multiply the i-th smallest (0-based) by (m - i), take running maxima, cap at 1."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: (math.isnan(pvalues[i]), pvalues[i]))
    adjusted = [math.nan] * m
    running = 0.0
    for rank, i in enumerate(order):
        p = pvalues[i]
        if math.isnan(p):
            continue
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def _label(results: dict[str, list[dict]], contrast: dict[str, float]) -> str:
    pos = [a for a, c in contrast.items() if c > 0]
    neg = [a for a, c in contrast.items() if c < 0]
    return f"{' + '.join(pos)} vs {' + '.join(neg)}"


def _outcome(h: dict, alpha: float) -> str:
    p = h.get("p_adjusted", h.get("p"))
    if not isinstance(p, float) or math.isnan(p):
        if h.get("n", 0) >= 2:  # every seed gave the same contrast: no t statistic
            return f"not testable (the contrast is {100 * h['mean']:+.1f} pts on every seed: zero variance)"
        return "not testable (fewer than 2 paired seeds)"
    if h["test"] == "tost":
        return (f"equivalent within +-{100 * h['margin']:.1f} pts" if p < alpha
                else f"equivalence within +-{100 * h['margin']:.1f} pts not shown")
    if p < alpha:
        return "positive arms higher" if h["mean"] > 0 else "positive arms lower"
    return "no difference shown"


def evaluate_plan(plan, results: dict[str, list[dict]]) -> dict[str, Any]:
    """Every hypothesis of ``plan`` on ``results`` (by arm): its contrast, estimate, interval,
    test, the Holm-adjusted p over the confirmatory family, and the outcome by the plan's rule."""
    tests = []
    for h in plan.hypotheses:
        metric = h.metric or plan.primary_metric
        seeds, c = contrast_values(results, h.contrast, metric)
        r = declared_test(c, h.test, margin=h.margin, alpha=plan.alpha)
        tests.append({"id": h.id, "question": h.question, "test": h.test, "metric": metric,
                      "contrast": h.contrast, "comparison": _label(results, h.contrast), "seeds": seeds,
                      "values": [float(x) for x in c], "confirmatory": h.confirmatory, **r})
    family = [t for t in tests if t["confirmatory"]]
    if plan.correction == "holm":
        for t, adj in zip(family, holm([t["p"] for t in family])):
            t["p_adjusted"] = adj
    for t in tests:
        t["outcome"] = _outcome(t, plan.alpha)
        ci = f"{100 * t['ci_level']:.0f}% CI [{100 * t['lo']:+.1f}, {100 * t['hi']:+.1f}]" if t["n"] > 1 else "no CI"
        p = t.get("p_adjusted", t["p"])
        padj = "Holm-adjusted " if "p_adjusted" in t else ""
        t["line"] = (f"{t['id']} ({t['test']}, {t['metric']}, {t['comparison']}): {100 * t['mean']:+.1f} pts, {ci}, "
                     f"{t['n']} seeds, {padj}p = {p:.3g}: {t['outcome']}")
    return {"alpha": plan.alpha, "correction": plan.correction, "primary_metric": plan.primary_metric,
            "family_size": len(family), "tests": tests}
