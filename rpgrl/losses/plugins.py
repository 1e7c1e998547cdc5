"""User losses: a Python entry point in group ``rpgrl.losses`` or a ``module:function`` path.

The loaded object is either a function with the loss contract (``rpgrl.losses.spec``) or a
ready ``LossSpec``. Optional attributes on a function: ``objective`` (the divergence whose
gradient it claims, for ``rpgrl check-loss``), ``description`` (else the docstring's first
line), ``uses_beta`` / ``uses_dual_clip`` (default True). Only ``rpgrl.losses.registry``
calls this module, so every consumer (``rpgrl train``, ``compare``, ``RPGTrainer``, the verl
plugin, ``check-loss``) resolves a name the same way.
"""

from __future__ import annotations

import dataclasses
import importlib
from importlib import metadata
from typing import Any

from rpgrl.losses.spec import OBJECTIVES, LossSpec

__all__ = ["ENTRY_POINT_GROUP", "entry_point_names", "load_entry_point", "load_path", "is_path"]

ENTRY_POINT_GROUP = "rpgrl.losses"


class PluginError(ValueError):
    """A plugin loss that cannot be loaded; the message names the entry point or path."""


def _entry_points() -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def entry_point_names() -> list[str]:
    """Names of the installed ``rpgrl.losses`` entry points (not loaded), in sorted order."""
    return sorted({ep.name for ep in _entry_points()})


def is_path(name: str) -> bool:
    return ":" in name


def _spec_from(obj: Any, name: str, source: str) -> LossSpec:
    if isinstance(obj, LossSpec):
        return dataclasses.replace(obj, name=name, source=source)
    if not callable(obj):
        raise PluginError(
            f"loss {name!r} ({source}) is a {type(obj).__name__}, expected a function "
            f"f(x: rpgrl.losses.LossInputs) -> token_loss | (token_loss, TrustRegion) or a LossSpec"
        )
    objective = getattr(obj, "objective", None)
    if objective is not None and objective not in OBJECTIVES:
        raise PluginError(f"loss {name!r} ({source}): objective={objective!r}, expected one of {OBJECTIVES}")
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    description = getattr(obj, "description", None) or (doc[0] if doc else f"plugin loss {name}")
    return LossSpec(
        name, "plugin", None, description, obj, objective=objective,
        uses_beta=bool(getattr(obj, "uses_beta", True)),
        uses_dual_clip=bool(getattr(obj, "uses_dual_clip", True)),
        source=source,
    )


def load_entry_point(name: str) -> LossSpec | None:
    """The ``rpgrl.losses`` entry point called ``name`` as a LossSpec; None if there is none."""
    matches = [ep for ep in _entry_points() if ep.name == name]
    if not matches:
        return None
    values = sorted({ep.value for ep in matches})
    if len(values) > 1:
        raise PluginError(f"loss {name!r}: several {ENTRY_POINT_GROUP} entry points disagree: {values}")
    source = f"entry point {name} = {values[0]}"
    try:
        obj = matches[0].load()
    except Exception as exc:  # noqa: BLE001 - any import error of a plugin is reported by name
        raise PluginError(f"loss {name!r}: loading the {ENTRY_POINT_GROUP} {source} failed: "
                          f"{type(exc).__name__}: {exc}") from exc
    return _spec_from(obj, name, source)


def load_path(path: str) -> LossSpec:
    """``package.module:function`` (attribute chains allowed after the colon) as a LossSpec."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise PluginError(f"loss {path!r}: expected 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001
        raise PluginError(f"loss {path!r}: cannot import module {module_name!r}: "
                          f"{type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"loss {path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return _spec_from(obj, path, f"path {path}")
