"""User-style scorers (verl's compute_score signature) used by the tests."""


def parity(data_source, solution_str, ground_truth, extra_info=None):
    """Non-constant within most groups, so every preset gets non-zero advantages."""
    return float(len(solution_str) % 2)


def always_raises(data_source, solution_str, ground_truth, extra_info=None):
    raise RuntimeError("scorer bug")
