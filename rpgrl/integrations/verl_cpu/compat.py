"""verl 0.9.1 vs the TRL that rpgrl's test environment installs.

When TRL is importable, verl's FSDP engine (verl/models/transformers/monkey_patch.py:352-362,
also verl/utils/model.py:611-615) imports ``AutoModelForCausalLMWithValueHead`` from
``trl.experimental.ppo`` or ``trl`` to patch its ``state_dict`` (a critic-only concern).
TRL 1.16 has neither, so building the *actor* fails with ImportError. :func:`install` makes
verl's ``is_trl_available`` answer False in this process exactly when that class cannot be
imported, i.e. when verl's TRL code path could only fail. With an older TRL nothing changes.
"""

from __future__ import annotations

import importlib.util
import os
import warnings


def trl_has_value_head() -> bool:
    """Whether ``trl.experimental.ppo`` (where TRL 1.x kept the value-head model) exists."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if importlib.util.find_spec("trl") is None:
                return False
            return importlib.util.find_spec("trl.experimental.ppo") is not None
        except (ImportError, ValueError):
            return False


def install() -> None:
    """Turn off verl's TRL value-head patch when it cannot work (module docstring)."""
    if importlib.util.find_spec("trl") is None or trl_has_value_head():
        return
    import verl.models.transformers.monkey_patch as monkey_patch
    import verl.utils.model as model_utils

    for module in (monkey_patch, model_utils):
        module.is_trl_available = lambda: False
