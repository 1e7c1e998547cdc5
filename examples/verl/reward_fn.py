"""verl custom reward function for the paper's runs: rpgrl's scorer (docs/math.md §9).

``rpgrl.rewards.compute_score(data_source, solution_str, ground_truth, extra_info)`` has
verl's signature; it reads the ``Answer:`` line first, then ``\\boxed{}``, with a
math-verify fallback, for every data source (verl's built-in scorer has no route for
``amc_23``). It returns ``{"score", "acc", "pred"}``: ``acc`` is DAPO's filter metric.
"""

from rpgrl.rewards import compute_score

__all__ = ["compute_score"]
