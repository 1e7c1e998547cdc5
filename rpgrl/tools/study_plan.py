"""A pre-registered study as a file: ``rpgrl compare --plan PLAN.yaml``.

A plan names everything a study fixes before its first run (docs/benchmarks.md, section 4):
the config and the overrides every arm shares, the arms (each a preset plus the keys it
changes, and its seeds), the primary metric, the significance level, the multiplicity
correction and the hypotheses with their declared tests (``rpgrl.tools.hypotheses``). Committed
before the runs, the file is the machine-readable half of the pre-registration; ``rpgrl compare
--plan`` runs every arm x seed (resumably), checks the pairing, and reports each hypothesis
exactly as declared.

    config: configs/real/study2.yaml
    overrides: [trainer.num_threads=1]
    primary_metric: last
    alpha: 0.05
    correction: holm
    arms:
      dapo: {preset: dapo, seeds: 0-7}
      ppo_mean_adv: {preset: dapo, set: {algorithm.advantage: rpg}, seeds: 0-7}
    hypotheses:
      - id: H1
        test: paired_t            # or tost (with margin), on the per-seed contrast below
        contrast: {dapo: 1, ppo_mean_adv: -1}
        question: ...

Errors name the plan file and the key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rpgrl.tools.arms import Arm, parse_seeds

__all__ = ["Hypothesis", "Plan", "load_plan"]

#: per-run numbers a hypothesis may test (``compare_report.run_result`` keys, and ``auc``)
METRICS = ("last", "best", "strict_last", "auc")
TESTS = ("paired_t", "tost")
CORRECTIONS = ("holm", "none")


@dataclass(frozen=True)
class Hypothesis:
    """One declared test: the per-seed contrast sum_arm coef * metric(arm, seed), tested by
    ``test`` (``paired_t``: two-sided, mean 0; ``tost``: equivalence within +-``margin``);
    ``confirmatory`` tests share the family's multiplicity correction."""

    id: str
    test: str
    contrast: dict[str, float]
    question: str = ""
    margin: float | None = None
    metric: str | None = None  # None: the plan's primary metric
    confirmatory: bool = True


@dataclass(frozen=True)
class Plan:
    path: str
    config: str | None
    overrides: tuple[str, ...]
    arms: dict[str, dict[str, Any]]  # name -> {"preset", "set": {key: value}, "seeds": [..]}
    hypotheses: tuple[Hypothesis, ...]
    primary_metric: str = "last"
    alpha: float = 0.05
    correction: str = "holm"
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def arm_list(self):
        """The plan's arms as ``rpgrl.tools.compare.Arm`` (preset first, then the arm's keys)."""
        return [Arm(name, (f"algorithm.preset={a['preset']}", *(f"{k}={_item(v)}" for k, v in a["set"].items())),
                    tuple(a["seeds"])) for name, a in self.arms.items()]


def _item(value: Any) -> str:
    """A value as a dotted-override string (``None`` -> ``null``, the YAML spelling)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def load_plan(path: str | Path) -> Plan:
    """Read and check a plan (module docstring); every config it implies is built later by
    ``rpgrl compare`` before the first run."""
    from rpgrl.config import PRESETS, ConfigError

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"compare --plan {path}: cannot read it: {exc}") from None

    def bad(key: str, msg: str) -> ConfigError:
        return ConfigError(f"compare --plan {path}: {key}: {msg}")

    known = {"config", "overrides", "arms", "hypotheses", "primary_metric", "alpha", "correction", "notes"}
    for key in raw:
        if key not in known:
            raise bad(key, f"unknown key; expected one of {', '.join(sorted(known))}")
    arms_raw = raw.get("arms")
    if not isinstance(arms_raw, dict) or not arms_raw:
        raise bad("arms", "give at least one arm: name: {preset: ..., seeds: ...}")
    arms: dict[str, dict[str, Any]] = {}
    for name, a in arms_raw.items():
        if not isinstance(a, dict) or "preset" not in a or "seeds" not in a:
            raise bad(f"arms.{name}", "needs preset and seeds (and optionally set: {key: value})")
        if a["preset"] not in PRESETS:
            raise bad(f"arms.{name}.preset", f"unknown preset {a['preset']!r}; allowed: {', '.join(PRESETS)}")
        extra = set(a) - {"preset", "seeds", "set", "label"}
        if extra:
            raise bad(f"arms.{name}", f"unknown key(s) {sorted(extra)}; expected preset, seeds, set, label")
        sets = a.get("set") or {}
        if not isinstance(sets, dict):
            raise bad(f"arms.{name}.set", "must map dotted config keys to values")
        try:
            seeds = parse_seeds(a["seeds"] if isinstance(a["seeds"], (int, list)) else str(a["seeds"]))
        except ConfigError as exc:
            raise bad(f"arms.{name}.seeds", str(exc)) from None
        arms[str(name)] = {"preset": a["preset"], "set": dict(sets), "seeds": seeds,
                           **({"label": str(a["label"])} if "label" in a else {})}
    metric = raw.get("primary_metric", "last")
    if metric not in METRICS:
        raise bad("primary_metric", f"{metric!r}; expected one of {', '.join(METRICS)}")
    alpha = raw.get("alpha", 0.05)
    if not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise bad("alpha", f"must be in (0, 1), got {alpha!r}")
    correction = raw.get("correction", "holm")
    if correction not in CORRECTIONS:
        raise bad("correction", f"{correction!r}; expected one of {', '.join(CORRECTIONS)}")
    hyps = []
    seen = set()
    for i, h in enumerate(raw.get("hypotheses") or []):
        where = f"hypotheses[{i}]"
        if not isinstance(h, dict) or not {"id", "test", "contrast"} <= set(h):
            raise bad(where, "needs id, test and contrast")
        if h["id"] in seen:
            raise bad(f"{where}.id", f"{h['id']!r} is used twice")
        seen.add(h["id"])
        if h["test"] not in TESTS:
            raise bad(f"{where}.test", f"{h['test']!r}; expected one of {', '.join(TESTS)}")
        contrast = h["contrast"]
        if not isinstance(contrast, dict) or not contrast:
            raise bad(f"{where}.contrast", "must map arm names to coefficients")
        for arm, coef in contrast.items():
            if arm not in arms:
                raise bad(f"{where}.contrast", f"unknown arm {arm!r}; arms: {', '.join(arms)}")
            if not isinstance(coef, (int, float)):
                raise bad(f"{where}.contrast.{arm}", f"must be a number, got {coef!r}")
        if abs(sum(contrast.values())) > 1e-12:
            raise bad(f"{where}.contrast", f"coefficients must sum to 0 (a difference of arms), got {contrast}")
        margin = h.get("margin")
        if h["test"] == "tost" and not (isinstance(margin, (int, float)) and margin > 0):
            raise bad(f"{where}.margin", "tost needs an equivalence margin > 0 (in accuracy units, 0.05 = 5 points)")
        hmetric = h.get("metric")
        if hmetric is not None and hmetric not in METRICS:
            raise bad(f"{where}.metric", f"{hmetric!r}; expected one of {', '.join(METRICS)}")
        extra = set(h) - {"id", "test", "contrast", "question", "margin", "metric", "confirmatory"}
        if extra:
            raise bad(where, f"unknown key(s) {sorted(extra)}")
        hyps.append(Hypothesis(str(h["id"]), h["test"], {str(k): float(v) for k, v in contrast.items()},
                               str(h.get("question", "")), None if margin is None else float(margin), hmetric,
                               bool(h.get("confirmatory", True))))
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise bad("overrides", "must be a list of dotted key=value strings")
    return Plan(str(path), raw.get("config"), tuple(overrides), arms, tuple(hyps), metric, float(alpha), correction,
                dict(raw.get("notes") or {}))
