"""RPG policy losses (spec sections 2-6): pure tensor math, no model or config objects.

    from rpgrl.losses import policy_loss, LOSSES
    loss, metrics = policy_loss("rpg_reinforce_ufkl", logp, old_logp, advantages, mask)

Layout: ``divergences`` (the table of KL rows), ``clip`` (trust region), ``surrogates``
(the differentiable and the REINFORCE kernel), ``aggregate`` (spec 6), ``registry``
(name -> spec, ``policy_loss``).
"""

from rpgrl.losses.aggregate import AGG_MODES, aggregate, aggregation_count
from rpgrl.losses.bound import BoundLoss
from rpgrl.losses.divergences import DIVERGENCES, Divergence
from rpgrl.losses.registry import LOSSES, METRIC_KEYS, LossSpec, policy_loss

__all__ = [
    "AGG_MODES",
    "BoundLoss",
    "DIVERGENCES",
    "Divergence",
    "LOSSES",
    "LossSpec",
    "METRIC_KEYS",
    "aggregate",
    "aggregation_count",
    "policy_loss",
]
