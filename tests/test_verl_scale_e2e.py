"""verl 0.9.1's real trainer on CPU: rollout correction and the iterative reference (docs/math.md §1.1).

Marker ``verl_e2e`` (real ``main_ppo`` through :mod:`rpgrl.integrations.verl_cpu`, minutes each).
Each run is first checked to train off-policy with the rpgrl loss in the trainer it uses
(legacy, v1): :func:`verl_runs.check_trains_off_policy`, reasoning in tests/test_verl_e2e.py.

* rollout correction: the ``rpgrl_hf`` rollout samples in bfloat16 while the FSDP actor is fp32,
  so the rollout's log-probs really differ from pi_old; verl's token TIS weights
  (``algorithm.rollout_correction.rollout_is=token``) must reach the rpgrl loss. The batch is
  one mini-batch and one micro-batch (2 epochs), so the loss's mean weight equals verl's
  ``rollout_corr/rollout_is_mean`` of the batch. The same run has ``anchor=fixed`` (legacy
  trainer): the batch-start KL between pi_old and the anchor is 0 at step 1 and > 0 after.
* ``anchor=periodic`` with K = 8 optimizer steps = 2 batches, in verl's asynchronous v1
  trainer (``trainer.v1.trainer_mode=colocate_async``: one batch is generated ahead
  (``num_warmup_batches=1``), so from step 2 on the samples come from the policy one update
  older, verl's ``training/off_policy/trajectory_staleness``). The anchor is refreshed at the
  start of step 3, so that KL is 0 at steps 1 and 3 and > 0 at steps 2 and 4, and exactly one
  refresh happened in 4 steps. The same run has token TIS on (the decoupled correction): on
  the stale steps pi_rollout and the recomputed pi_old really differ, and the weights reach
  the rpgrl loss.

Bypass mode (``rollout_correction.bypass_mode=true``) is tested without a run in
tests/test_integration_verl.py (an e2e run costs ~2 more minutes of CI).

The checks hold whatever the CPU draws: they need only that the policy moves at every update,
which the prefix-rank toy reward (``verl_cpu/reward.py``: a group ties with probability
< 2e-4) all but guarantees, and they compare KLs with 0 or with each other, never with values
from one machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("verl", reason="verl is not installed (CI: pip install --no-deps 'verl==0.9.1', see .ci/run)")

from rpgrl.integrations.verl_cpu.run import run  # noqa: E402
from verl_runs import check_trains_off_policy  # noqa: E402

pytestmark = [pytest.mark.verl_e2e, pytest.mark.medium]

STEPS = 4
PL = "actor_rollout_ref.actor.policy_loss"
#: pi_old and the anchor computed from identical fp32 weights: equal up to float noise
SAME = 1e-9


def _loss_sees_the_anchor(steps: list[dict], fresh: list[bool]) -> None:
    """The loss's KL to the anchor (log pi_theta - ref_log_prob) equals its KL to the rollout
    policy (log pi_theta - old_log_prob), to 1e-6, when the anchor is pi_old (``fresh``), and not
    otherwise: the loss scores against verl's ref_log_prob, whatever the draw."""
    for m, same in zip(steps, fresh):
        anchor, rollout = m["actor/rpg/kl_anchor_k3"], m["actor/rpg/kl_rollout_k3"]
        if same:
            assert anchor == pytest.approx(rollout, rel=1e-6), m
        else:
            assert abs(anchor - rollout) > 1e-4, m


def test_rollout_correction_and_fixed_anchor_legacy(tmp_path: Path) -> None:
    res = run(tmp_path / "rc_fixed", trainer="legacy", steps=STEPS, timeout_s=1800, extra=[
        "actor_rollout_ref.rollout.dtype=bfloat16",
        "algorithm.rollout_correction.rollout_is=token", "algorithm.rollout_correction.rollout_is_threshold=2.0",
        f"+{PL}.anchor=fixed",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
    ])
    steps = check_trains_off_policy(res, STEPS)
    assert "rpgrl.integrations.verl_anchor" in (res.out / "command.txt").read_text()
    for m in steps:
        # the rollout (bf16) and pi_old (fp32) disagree, so the weights are not all 1 ...
        assert m["rollout_corr/k3_kl"] > 1e-7, m
        assert abs(m["rollout_corr/rollout_is_mean"] - 1) > 1e-5, m
        assert m["rollout_corr/rollout_is_max"] <= 2.0 + 1e-6
        # ... and the rpgrl loss received exactly verl's weights of this batch
        assert m["actor/rpg/rollout_is_weight_mean"] == pytest.approx(m["rollout_corr/rollout_is_mean"], rel=1e-5)
        assert m["actor/rpg/anchor_refreshes"] == 0  # fixed: never refreshed
    assert [m["actor/rpg/anchor_steps_since_refresh"] for m in steps] == [2, 4, 6, 8]  # 2 optimizer steps a batch
    kl = [m["actor/rpg/anchor_kl_old_k3"] for m in steps]
    assert kl[0] < SAME, kl  # step 1: the anchor is the initial policy = pi_old
    assert all(k > 1e-3 for k in kl[1:]), kl  # then the policy has moved away from it, and stays away
    _loss_sees_the_anchor(steps, fresh=[True, False, False, False])


def test_periodic_anchor_in_the_async_v1_trainer(tmp_path: Path) -> None:
    # 2 mini-batches x ppo_epochs 2 = 4 optimizer steps per batch; K = 8
    res = run(tmp_path / "periodic", trainer="v1", steps=STEPS, timeout_s=1800, extra=[
        f"+{PL}.anchor=periodic", f"+{PL}.anchor_period=8", "trainer.v1.trainer_mode=colocate_async",
        "algorithm.rollout_correction.rollout_is=token", "algorithm.rollout_correction.rollout_is_threshold=2.0",
    ])
    steps = check_trains_off_policy(res, STEPS)
    kl = [m["actor/rpg/anchor_kl_old_k3"] for m in steps]
    assert kl[0] < SAME and kl[2] < SAME, kl  # right after the start and right after the refresh
    assert kl[1] > 1e-6 and kl[3] > 1e-6, kl  # a stale anchor in between
    assert [m["actor/rpg/anchor_refreshes"] for m in steps] == [0, 0, 1, 1]
    assert [m["actor/rpg/anchor_steps_since_refresh"] for m in steps] == [4, 8, 4, 8]
    _loss_sees_the_anchor(steps, fresh=[True, False, True, False])
    # asynchronous: verl reports samples from an older policy, and there the fp32 rollout's
    # log-probs differ from pi_old by more than float noise (fresh samples: < 1e-6)
    stale = [m for m in steps if m["training/off_policy/trajectory_staleness/max"] >= 1]
    assert stale, [m["training/off_policy/trajectory_staleness/max"] for m in steps]
    for m in stale:
        assert m["rollout_corr/k3_kl"] > 1e-4, m
        assert 0 < m["actor/rpg/rollout_is_weight_mean"] <= 2.0 + 1e-6 and m["actor/rpg/rollout_is_weight_mean"] != 1.0, m
