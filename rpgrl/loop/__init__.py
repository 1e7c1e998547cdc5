"""The online RL loop and its stages: collect (generate + score), prepare (log-probs, advantages), update; evaluation, checkpoints, metrics."""
