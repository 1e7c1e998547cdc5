"""RPG policy losses (docs/math.md §2-6): pure tensor math, no model or config objects.

    from rpgrl.losses import policy_loss, LOSSES
    loss, metrics = policy_loss("rpg_reinforce_ufkl", logp, old_logp, advantages, mask)

Layout: ``divergences`` (the table of KL rows), ``clip`` (trust region), ``surrogates``
(the differentiable and the REINFORCE kernel), ``baselines`` (GSPO, CISPO), ``aggregate``
(docs/math.md §6), ``spec`` (the loss contract: ``LossInputs``, ``LossSpec``), ``plugins`` (entry
points / ``module:function`` paths), ``registry`` (name -> spec), ``policy`` (``policy_loss``:
running a loss, its hyperparameter rules, metrics),
``check`` (the exact-enumeration gradient check behind ``rpgrl check-loss``).
"""

from rpgrl.losses.aggregate import AGG_MODES, aggregate, aggregation_count
from rpgrl.losses.bound import BoundLoss
from rpgrl.losses.divergences import DIVERGENCES, Divergence
from rpgrl.losses.clip import TrustRegion, trust_region
from rpgrl.losses.plugins import ENTRY_POINT_GROUP
from rpgrl.losses.policy import KL_SHARE_KEYS, MAX_METRIC_KEYS, METRIC_KEYS, kl_share, policy_loss
from rpgrl.losses.registry import LOSSES, UnknownLossError, resolve_loss
from rpgrl.losses.spec import LossInputs, LossSpec
from rpgrl.losses.surrogates import Ratios

__all__ = [
    "AGG_MODES",
    "BoundLoss",
    "DIVERGENCES",
    "Divergence",
    "ENTRY_POINT_GROUP",
    "LOSSES",
    "LossInputs",
    "LossSpec",
    "KL_SHARE_KEYS",
    "MAX_METRIC_KEYS",
    "METRIC_KEYS",
    "Ratios",
    "TrustRegion",
    "UnknownLossError",
    "aggregate",
    "aggregation_count",
    "policy_loss",
    "resolve_loss",
    "trust_region",
]
