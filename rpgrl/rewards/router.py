"""``compute_score`` (verl's reward-function signature), routing by ``data_source``, and
loading of user scorers given as ``"module:function"`` or ``"path/file.py:function"``.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any
from collections.abc import Callable

from rpgrl.rewards.scorers import BUILTIN_SCORERS

__all__ = ["ROUTES", "route", "compute_score", "load_scorer", "ScorerSpecError"]

# (glob over data_source, built-in scorer name); first match wins, else "default".
# Everything known today wants the default (Answer: first, \boxed{} second, math-verify
# fallback); the table is where a source with other conventions gets its own scorer.
ROUTES: list[tuple[str, str]] = [
    ("math_dapo*", "default"),
    ("aime*", "default"),
    ("amc*", "default"),
    ("rpgrl/arith_chat", "arith_chat"),
    ("rpgrl/*", "default"),
]


class ScorerSpecError(ValueError):
    """A ``scorer`` spec that cannot be resolved to a callable."""


def route(data_source: str) -> str:
    """Name of the built-in scorer for ``data_source``."""
    for pattern, name in ROUTES:
        if fnmatch.fnmatchcase(data_source, pattern):
            return name
    return "default"


def compute_score(data_source: str, solution_str: str, ground_truth: str,
                  extra_info: dict | None = None) -> dict[str, Any]:
    """Score one response with the built-in scorer routed by ``data_source``.

    Same signature as a verl custom reward function, so it can be passed to verl as-is.
    Returns ``{"score": 1.0|0.0, "acc": bool, "pred": normalised answer or None}``.
    """
    return BUILTIN_SCORERS[route(data_source)](solution_str, ground_truth)


class _BuiltinScorer:
    """A built-in scorer behind the verl signature; pickles by name."""

    builtin = True

    def __init__(self, name: str) -> None:
        self.name = name
        self._fn = BUILTIN_SCORERS[name]

    def __call__(self, data_source: str, solution_str: str, ground_truth: str,
                 extra_info: dict | None = None) -> dict[str, Any]:
        return self._fn(solution_str, ground_truth)

    def __reduce__(self):
        return (_BuiltinScorer, (self.name,))

    def __repr__(self) -> str:
        return f"<rpgrl built-in scorer {self.name!r}>"


class _LoadedScorer:
    """A user scorer loaded from a spec; pickles as the spec, so a spawned worker process
    re-imports it (functions loaded from a file path are not importable by name)."""

    builtin = False

    def __init__(self, spec: str, fn: Callable) -> None:
        self.spec = spec
        self._fn = fn

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __reduce__(self):
        return (load_scorer, (self.spec,))

    def __repr__(self) -> str:
        return f"<rpgrl scorer {self.spec!r}>"


def _import_file(path: Path, spec: str):
    if not path.is_file():
        raise ScorerSpecError(f"scorer {spec!r}: file {str(path)!r} does not exist")
    mod_name = "rpgrl_user_scorer_" + str(abs(hash(str(path.resolve()))))
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    mspec = importlib.util.spec_from_file_location(mod_name, path)
    if mspec is None or mspec.loader is None:
        raise ScorerSpecError(f"scorer {spec!r}: cannot load {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(mspec)
    sys.modules[mod_name] = module
    try:
        mspec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[mod_name]
        raise ScorerSpecError(f"scorer {spec!r}: importing {str(path)!r} failed: {exc!r}") from exc
    return module


def load_scorer(spec: str) -> Callable[..., Any]:
    """Resolve a scorer spec to a callable ``f(data_source, solution_str, ground_truth,
    extra_info=None)`` returning a float or a dict with a numeric ``"score"``.

    Accepted: a built-in name (``default``, ``dapo``, ``boxed``, ``math_verify``),
    ``"package.module:function"`` or ``"path/to/file.py:function"``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ScorerSpecError(f"scorer spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec in BUILTIN_SCORERS:
        return _BuiltinScorer(spec)
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ScorerSpecError(
            f"scorer {spec!r}: expected 'module:function', 'path/to/file.py:function' or one "
            f"of the built-ins {sorted(BUILTIN_SCORERS)}"
        )
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _import_file(Path(target).expanduser(), spec)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise ScorerSpecError(f"scorer {spec!r}: cannot import module {target!r}: {exc!r}") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise ScorerSpecError(f"scorer {spec!r}: module {target!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ScorerSpecError(f"scorer {spec!r}: {attr!r} is a {type(fn).__name__}, not callable")
    return _LoadedScorer(spec, fn)
