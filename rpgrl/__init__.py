"""rpgrl: Regularized Policy Gradient (Zhang et al., ICLR 2026) for LLM reasoning.

The package follows the data flow (docs/architecture.md):

- ``losses/``, ``algorithm/``: the math -- pure tensor functions (losses, advantages, KL anchors
  and estimators); ``docs/algorithms.md`` maps each equation of ``docs/math.md`` to its function.
- ``data/``, ``rewards/``: the task -- prompts (verl parquet, procedural) and their scorers.
- ``loop/``: the online RL loop and its stages (collect -> prepare -> update), evaluation,
  checkpoints, metrics.
- ``models/``: loading models (HF, GGUF, the built-in tiny one) and computing log-probs on them.
- ``parallel/``: how the policy is spread over processes (replicated, FSDP2) under torchrun.
- ``tools/``: ``rpgrl compare`` / ``plot`` / ``check-loss`` / ``explain``.
- ``integrations/``: RPG losses inside TRL and verl.
"""

__version__ = "0.1.0"
