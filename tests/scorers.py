"""User-style scorers (verl's compute_score signature) used by the tests."""

import os


def parity(data_source, solution_str, ground_truth, extra_info=None):
    """Non-constant within most groups: 4 samples of the tests' warm start share a length parity
    with probability ~0.2, so a test that needs a gradient uses tests/informative.py instead."""
    return float(len(solution_str) % 2)


def always_raises(data_source, solution_str, ground_truth, extra_info=None):
    raise RuntimeError("scorer bug")


def parity_on_rank0(data_source, solution_str, ground_truth, extra_info=None):
    """``parity`` on torchrun rank 0, 0.0 elsewhere: under dynamic sampling only rank 0 keeps
    groups of its own, so the ranks' local kept counts always differ."""
    return parity(data_source, solution_str, ground_truth) if os.environ.get("RANK", "0") == "0" else 0.0
