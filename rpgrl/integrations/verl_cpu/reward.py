"""Toy reward for the CPU smoke run (verl ``reward.custom_reward_function``).

A randomly initialised model never solves arithmetic, so an exact-match reward would be 0
for every sample, every RPG group advantage (docs/math.md §5: A = R - group mean) would be 0
and the loss would carry no signal. This reward is the fraction of response characters
that equal the ground truth's first character: it differs between samples of one prompt.
"""

from __future__ import annotations

from typing import Any


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: Any = None, **_: Any) -> float:
    target = str(ground_truth)[:1]
    text = solution_str or ""
    return sum(c == target for c in text) / max(len(text), 1)
