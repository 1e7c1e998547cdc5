"""verl 0.9.1's real trainer on CPU: rollout correction and the iterative reference (docs/math.md §1.1).

Marker ``verl_e2e`` (real ``main_ppo`` through :mod:`rpgrl.integrations.verl_cpu`, minutes each):

* rollout correction: the ``rpgrl_hf`` rollout samples in bfloat16 while the FSDP actor is fp32,
  so the rollout's log-probs really differ from pi_old; verl's token TIS weights
  (``algorithm.rollout_correction.rollout_is=token``) must reach the rpgrl loss. The batch is
  one mini-batch and one micro-batch (2 epochs), so the loss's mean weight equals verl's
  ``rollout_corr/rollout_is_mean`` of the batch. The same run has ``anchor=fixed`` (legacy
  trainer): the batch-start KL between pi_old and the anchor is 0 at step 1 and grows.
* ``anchor=periodic`` with K = 8 optimizer steps = 2 batches (v1 trainer): the anchor is
  refreshed at the start of step 3, so that KL is 0 at steps 1 and 3 and > 0 at steps 2 and 4,
  and exactly one refresh happened in 4 steps.

No assertion depends on the rewards (the toy reward can give one score to every sample).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("verl", reason="verl is not installed (CI: pip install --no-deps 'verl==0.9.1', see .ci/run)")

from rpgrl.integrations.verl_cpu.run import RunResult, run  # noqa: E402

pytestmark = [pytest.mark.verl_e2e, pytest.mark.medium]

STEPS = 4
PL = "actor_rollout_ref.actor.policy_loss"
#: pi_old and the anchor computed from identical fp32 weights: equal up to float noise
SAME = 1e-9


def _ok(res: RunResult) -> list[dict]:
    assert res.returncode == 0, f"main_ppo failed (exit {res.returncode}); log tail:\n{res.log[-4000:]}"
    assert res.remaining_pids == [], f"processes survived the clean-up: {res.remaining_pids}"
    steps = [m for m in res.metrics if "actor/pg_loss" in m]
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1)), f"logged training steps: {res.metrics}"
    for m in steps:
        rpg = {k: v for k, v in m.items() if k.startswith("actor/rpg/")}
        assert rpg and all(math.isfinite(v) for v in rpg.values()), rpg
    return steps


def test_rollout_correction_and_fixed_anchor_legacy(tmp_path: Path) -> None:
    res = run(tmp_path / "rc_fixed", trainer="legacy", steps=STEPS, timeout_s=1800, extra=[
        "actor_rollout_ref.rollout.dtype=bfloat16",
        "algorithm.rollout_correction.rollout_is=token", "algorithm.rollout_correction.rollout_is_threshold=2.0",
        f"+{PL}.anchor=fixed",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
    ])
    steps = _ok(res)
    assert "rpgrl.integrations.verl_anchor" in (res.out / "command.txt").read_text()
    for m in steps:
        # the rollout (bf16) and pi_old (fp32) disagree, so the weights are not all 1 ...
        assert m["rollout_corr/k3_kl"] > 1e-7, m
        assert abs(m["rollout_corr/rollout_is_mean"] - 1) > 1e-5, m
        assert m["rollout_corr/rollout_is_max"] <= 2.0 + 1e-6
        # ... and the rpgrl loss received exactly verl's weights of this batch
        assert m["actor/rpg/rollout_is_weight_mean"] == pytest.approx(m["rollout_corr/rollout_is_mean"], rel=1e-5)
        assert m["actor/rpg/anchor_refreshes"] == 0  # fixed: never refreshed
    kl = [m["actor/rpg/anchor_kl_old_k3"] for m in steps]
    assert kl[0] < SAME, kl  # step 1: the anchor is the initial policy = pi_old
    assert all(k > 1e-6 for k in kl[1:]) and kl[-1] > kl[1], kl  # then the policy moves away from it
    # the loss's own KL to the anchor (log pi_theta / pi_ref) tracks it
    assert steps[-1]["actor/rpg/kl_anchor_k3"] > steps[-1]["actor/rpg/kl_rollout_k3"], steps[-1]


def test_periodic_anchor_refreshes_every_two_batches_v1(tmp_path: Path) -> None:
    # 2 mini-batches x ppo_epochs 2 = 4 optimizer steps per batch; K = 8
    res = run(tmp_path / "periodic", trainer="v1", steps=STEPS, timeout_s=1800, extra=[
        f"+{PL}.anchor=periodic", f"+{PL}.anchor_period=8",
    ])
    steps = _ok(res)
    kl = [m["actor/rpg/anchor_kl_old_k3"] for m in steps]
    assert kl[0] < SAME and kl[2] < SAME, kl  # right after the start and right after the refresh
    assert kl[1] > 1e-6 and kl[3] > 1e-6, kl  # a stale anchor in between
    assert [m["actor/rpg/anchor_refreshes"] for m in steps] == [0, 0, 1, 1]
    assert [m["actor/rpg/anchor_steps_since_refresh"] for m in steps] == [4, 8, 4, 8]
