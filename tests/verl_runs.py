"""Checks shared by the verl_e2e tests: a real ``main_ppo`` run finished cleanly with an rpgrl loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

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


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def check_trains_off_policy(res: RunResult, steps_n: int) -> list[dict]:
    """The rpgrl loss trained, off-policy: finite losses, verl's clip fraction filled from
    rpgrl's, and on every step with signal w != 1, KL to the rollout > 0, a gradient; the
    trust region clipped somewhere; the weights moved (verl's hf checkpoint vs the initial
    model). Fails with verl's ``vanilla`` loss (no ``actor/rpg/*`` metrics). Returns the steps."""
    steps = training_steps(res, steps_n)
    for m in steps:
        assert math.isfinite(m["actor/pg_loss"]) and math.isfinite(m["actor/grad_norm"])
        # verl's dashboard key is filled from rpgrl's own clip counts.
        assert m["actor/pg_clipfrac"] == pytest.approx(
            m["actor/rpg/clipfrac_upper"] + m["actor/rpg/clipfrac_lower"], abs=1e-6
        )
    signal = [m for m in steps if m["critic/advantages/max"] > 0]  # some group's rewards differ
    assert signal, "no step had two different rewards in a group (see the module docstring)"
    for m in signal:
        rpg = {k: v for k, v in m.items() if k.startswith("actor/rpg/")}
        # Off-policy: after a mini-batch update with signal the policy moved, so w != 1 in
        # the later ones (docs/math.md §3-4, Algorithm 1-2).
        assert m["critic/score/max"] > m["critic/score/min"]
        assert m["actor/rpg/importance_weight_max"] > 1.05, rpg
        assert m["actor/rpg/kl_rollout_k3"] > 1e-4, rpg
        assert m["actor/pg_loss"] != 0.0 and 0 < m["actor/grad_norm"] < 1e3, m
    # ... and the RPG-Style clip / trust region fired
    clip = [m["actor/rpg/clipfrac_upper"] + m["actor/rpg/clipfrac_lower"] for m in signal]
    assert max(clip) > 0, f"the trust region never clipped: {clip}"

    # The policy's weights changed (a step with signal moved them): verl's hf_model checkpoint
    # vs the initial model.
    before = _tensors(res.out / "model" / "model.safetensors")
    after = _tensors(res.out / "ckpt" / f"global_step_{steps_n}" / "actor" / "huggingface" / "model.safetensors")
    assert set(after) == set(before)
    changed = {k: float((after[k].float() - before[k].float()).abs().max()) for k in before}
    assert all(math.isfinite(v) for v in changed.values())
    assert sum(v > 1e-3 for v in changed.values()) >= len(changed) // 2, changed
    return steps
