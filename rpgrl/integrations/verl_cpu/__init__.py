"""verl 0.9's real trainer (``python -m verl.trainer.main_ppo``) on CPU, for tests and laptops.

Everything goes through verl's own extension points; no verl file is edited:

* :mod:`.plugin` is what ``VERL_USE_EXTERNAL_MODULES=rpgrl.integrations.verl_cpu.plugin``
  imports on ``import verl`` (driver and every Ray worker). It registers the ``cpu``
  platform (:mod:`.cpu_platform`, selected with ``VERL_PLATFORM=cpu``), the ``rpgrl_hf``
  rollout (:mod:`.rollout`), the ``rpgrl_ray`` checkpoint engine (:mod:`.checkpoint`: weight
  sync to a standalone rollout, for verl's disaggregated pipelines) and rpgrl's losses /
  ``rpg`` advantage (:mod:`rpgrl.integrations.verl`).
* :mod:`.run` builds a tiny local model and data set and runs ``main_ppo`` with the settings
  that make it fit on 2 CPU cores (``python -m rpgrl.integrations.verl_cpu``), then makes
  sure no Ray process outlives the run.
* :mod:`.reward` is a toy reward (verl ``custom_reward_function``): a rank of the response's
  first tokens, so that samples of a random model almost never tie and RPG's group
  advantages are non-zero.

Tested with verl 0.9.1 only (``VERL_VERSIONS``); the file:line references in the docstrings
are to that version.
"""

#: verl versions this CPU support was run with.
VERL_VERSIONS = ("0.9.1",)
