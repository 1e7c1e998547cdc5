"""rpgrl: Regularized Policy Gradient (Zhang et al., ICLR 2026) for LLM reasoning.

The math lives in pure tensor functions (``rpgrl.losses``, ``rpgrl.advantages``,
``rpgrl.kl``); the trainer composes them. See ``docs/algorithms.md`` for the map from
each equation of ``docs/math.md`` to the function that implements it.
"""

__version__ = "0.1.0"
