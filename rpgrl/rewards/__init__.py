"""Rewards: answer extraction and normalisation, routing by data_source, math-verify
fallback, safe batch scoring of user scorers, overlong shaping (docs/math.md §7 and §9).

Public API:
    compute_score(data_source, solution_str, ground_truth, extra_info=None) -> dict
    load_scorer("module:function" | "path/file.py:function" | built-in name) -> callable
    score_batch(data_sources, responses, ground_truths, extra_infos=None, scorer=None,
                timeout_s=10.0) -> (rewards, stats)
    overlong_penalty(lengths, max_len, buffer_len, penalty_factor=1.0) -> Tensor
"""

from rpgrl.rewards.extract import extract_answer_line, extract_final_answer, last_boxed
from rpgrl.rewards.normalize import as_rational, normalize_answer
from rpgrl.rewards.router import ROUTES, ScorerSpecError, compute_score, load_scorer, route
from rpgrl.rewards.safe import close_workers, score_batch, to_reward
from rpgrl.rewards.scorers import BUILTIN_SCORERS, answers_match, score_response
from rpgrl.rewards.shaping import overlong_penalty

__all__ = [
    "BUILTIN_SCORERS", "ROUTES", "ScorerSpecError", "answers_match", "as_rational",
    "close_workers", "compute_score", "extract_answer_line", "extract_final_answer",
    "last_boxed", "load_scorer", "normalize_answer", "overlong_penalty", "route",
    "score_batch", "score_response", "to_reward",
]
