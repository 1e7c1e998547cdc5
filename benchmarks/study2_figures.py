"""Per-step curves of round 2 of the real-model study, one figure per hypothesis family
(docs/study2-preregistration.md): the 2 x 2 of H1/H2, the four KL forms at the paper's beta (H3),
the four forms against a fixed reference at beta* (H4), and the paper's GRPO recipe against DAPO
(H5). Drawn from the study's JSON alone (each run's ``eval_curve`` and ``curves``), so anyone can
redraw them without the run folders; mean over seeds with a min-max band.

    python benchmarks/study2_figures.py docs/results/real-study-2.json --out docs/figures
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rpgrl.tools.compare_report import curve_records
from rpgrl.tools.plots import plot_comparison

#: figure name -> (title, arms, seeds or None for every seed an arm has)
FAMILIES: dict[str, tuple[str, tuple[str, ...], tuple[int, ...] | None]] = {
    "study2_h1_h2": ("H1/H2: loss x advantage (8 seeds)",
                     ("dapo", "dapo_mean_adv", "rpg_reinforce_ufkl", "rpg_reinforce_ufkl_std_adv"), None),
    "study2_h3": ("H3: KL form at beta 1e-4, rollout anchor (seeds 0-4)",
                  ("rpg_reinforce_ufkl", "rpg_reinforce_fkl", "rpg_reinforce_rkl", "rpg_reinforce_urkl"), tuple(range(5))),
    "study2_h4": ("H4: KL form at beta* = 10, fixed reference (seeds 0-4)",
                  ("fixed_ufkl", "fixed_fkl", "fixed_rkl", "fixed_urkl"), tuple(range(5))),
    "study2_h5": ("H5: the paper's GRPO recipe vs DAPO (seeds 0-4)", ("dapo", "grpo_paper"), tuple(range(5))),
}


def family_runs(runs: list[dict], arms: tuple[str, ...], seeds: tuple[int, ...] | None) -> dict[str, list[list[dict]]]:
    """Each arm's per-seed curve records, arms in the given order; an arm with no run is left out."""
    out: dict[str, list[list[dict]]] = {}
    for arm in arms:
        chosen = sorted((r for r in runs if r["algorithm"] == arm and (seeds is None or r["seed"] in seeds)),
                        key=lambda r: r["seed"])
        if chosen:
            out[arm] = [curve_records(r) for r in chosen]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study_json")
    ap.add_argument("--out", default="docs/figures")
    args = ap.parse_args(argv)
    runs = json.loads(Path(args.study_json).read_text())["runs"]
    for name, (title, arms, seeds) in FAMILIES.items():
        drawn = family_runs(runs, arms, seeds)
        if drawn:
            print(plot_comparison(drawn, Path(args.out) / f"{name}.png", title=title))


if __name__ == "__main__":
    main()
