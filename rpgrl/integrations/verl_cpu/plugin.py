"""Imported by verl on ``import verl`` via ``VERL_USE_EXTERNAL_MODULES`` (verl/__init__.py:49-52),
in the driver and every Ray worker: registers the CPU platform, the ``rpgrl_hf`` rollout and
rpgrl's losses / ``rpg`` advantage in this process.

The rollout is registered by name only (a loader and a dotted path, as verl does for its own
backends), so that a worker which first imports :mod:`.rollout` (to unpickle the server actor)
does not re-enter it through ``import verl``.
"""

from verl.workers.rollout import base as _rollout_base
from verl.workers.rollout.replica import RolloutReplicaRegistry

from rpgrl.integrations import verl as _rpgrl_losses  # noqa: F401  (registers losses + rpg advantage)
from rpgrl.integrations.verl_cpu import compat, cpu_platform

#: ``actor_rollout_ref.rollout.name`` of the HF-generate rollout.
ROLLOUT_NAME = "rpgrl_hf"


def _load_replica():
    from rpgrl.integrations.verl_cpu.rollout import HFReplica

    return HFReplica


def register() -> None:
    """Register the platform fix-ups, the ``rpgrl_hf`` rollout and the ``rpgrl_ray`` checkpoint
    engine (idempotent)."""
    from rpgrl.integrations.verl_cpu import checkpoint  # noqa: F401  (CheckpointEngineRegistry "rpgrl_ray")

    cpu_platform.install()
    compat.install()
    RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica)
    _rollout_base._ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = "rpgrl.integrations.verl_cpu.rollout.HFServerAdapter"


register()
