"""A study's arms and seeds: the two things ``rpgrl compare`` and a study plan
(``rpgrl.tools.study_plan``) both need, kept apart from either."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Arm", "parse_seeds"]


@dataclass(frozen=True)
class Arm:
    """One setting of a study: its name (the report's row, the folder ``OUT/<name>/seed<k>``), the
    dotted overrides that make it (applied after the shared ones; a preset first) and its seeds."""

    name: str
    items: tuple[str, ...]
    seeds: tuple[int, ...]

    @property
    def folder(self) -> str:
        return self.name.replace(":", "_")


def parse_seeds(spec: str | int | list[int]) -> list[int]:
    """``3`` -> seeds 0, 1, 2 (a count); ``0,1,2`` or ``4,`` -> those seeds; ``2-4`` -> 2, 3, 4."""
    from rpgrl.config import ConfigError

    if isinstance(spec, int):
        spec = str(spec)
    if isinstance(spec, list):
        seeds = [int(s) for s in spec]
    else:
        text = str(spec).strip()
        try:
            if "," in text:
                seeds = [int(x) for x in text.split(",") if x.strip()]
            elif "-" in text.lstrip("-"):
                lo, hi = (int(x) for x in text.split("-"))
                seeds = list(range(lo, hi + 1))
            else:
                n = int(text)
                if n < 1:
                    raise ConfigError(f"compare: --seeds must be >= 1, got {n}")
                seeds = list(range(n))
        except ValueError:
            raise ConfigError(f"compare: --seeds {spec!r}: expected a count (3 = seeds 0,1,2), a list (0,1,2 or 4,) "
                              "or a range (2-4)") from None
    if not seeds or any(s < 0 for s in seeds):
        raise ConfigError(f"compare: --seeds {spec!r}: give at least one seed, each >= 0")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"compare: --seeds lists a seed twice: {seeds}")
    return seeds
