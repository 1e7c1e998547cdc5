"""Checks shared by the verl_e2e tests: a real ``main_ppo`` run finished cleanly with an rpgrl loss."""

from __future__ import annotations

import math

from rpgrl.integrations.verl_cpu.run import RunResult


def training_steps(res: RunResult, steps: int) -> list[dict]:
    """The metrics of training steps 1..``steps`` after asserting that the run exited 0, left no
    process of its session alive, logged every step, and that each step holds finite
    ``actor/rpg/*`` metrics (absent when the loss is not an rpgrl loss)."""
    assert res.returncode == 0, f"main_ppo failed (exit {res.returncode}); log tail:\n{res.log[-4000:]}"
    # Ray was shut down: nothing of the run's session is alive now.
    assert res.remaining_pids == [], f"processes survived the clean-up: {res.remaining_pids}"
    logged = [m for m in res.metrics if "actor/pg_loss" in m]
    assert [m["step"] for m in logged] == list(range(1, steps + 1)), f"logged training steps: {res.metrics}"
    for m in logged:
        rpg = {k: v for k, v in m.items() if k.startswith("actor/rpg/")}
        assert rpg, f"step {m['step']}: no actor/rpg/* metrics (is the loss an rpgrl loss?); keys: {sorted(m)}"
        assert all(math.isfinite(v) for v in rpg.values()), rpg
    return logged
