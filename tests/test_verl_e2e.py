"""verl 0.9's real trainer (``python -m verl.trainer.main_ppo``) trains with an rpgrl loss on CPU.

The runs are in tests/test_verl_scale_e2e.py (one legacy, one v1 trainer run, each checked
with :func:`verl_runs.check_trains_off_policy` as below, plus rollout correction and the
iterative reference); this file keeps the reasoning behind those checks and the clean-up test.

End to end: Ray, verl's FSDP2 actor, the ``rpgrl_hf`` rollout, log-prob recomputation, the
``rpg`` advantage and an off-policy update (2 mini-batches x ppo_epochs=2) on a tiny local
Llama, through verl's extension points only (``rpgrl.integrations.verl_cpu``). The run takes
~2.5 (legacy) / ~4.5 (v1) minutes on 2 lightly loaded cores (12.5 minutes at load average 15),
almost all of it Ray and verl start-up. Both of verl's trainers are run.

It fails if the rpgrl loss is replaced by verl's ``vanilla`` loss: the ``actor/rpg/*``
metrics (and the clip fractions computed by rpgrl) are then absent.

What is sampled depends on the CPU (AVX2 and AVX-512 machines draw differently from the same
seed), so no check may assume that a group's rewards differ. A step has signal when one of its
2 groups holds two different rewards: ``critic/advantages/max > 0`` (A = R - group mean is exact
for the toy reward's float32 values). Its first update whose mini-batch holds a non-zero
advantage then moves every weight with a gradient by about lr (Adam's first step does not
depend on the gradient's size), so the updates after it are off-policy by a margin that does
not depend on the draw: the off-policy checks below are made for steps with signal, the others
are checked for finite metrics, and the run needs one step with signal. The toy reward
(``verl_cpu/reward.py``) ties only responses with a common 4-token prefix; for the random
model's 8 prompts, 4 samples do so with probability 2e-6 to 1.5e-4 (2,000 samples each; the
empty response dominates), so step 1 (prompts 1+2 and 3+4) lacks signal with probability ~3e-11
(tests/test_toy_reward.py checks that premise in every run). The previous reward, the share of
characters equal to the answer's first digit, was 0 for all 8 samples of step 1 with
probability ~0.13 by the same estimate, and was on an AVX-512 machine.
"""

from __future__ import annotations

import pytest

pytest.importorskip("verl", reason="verl is not installed (CI: pip install --no-deps 'verl==0.9.1', see .ci/run)")

from rpgrl.integrations.verl_cpu.run import session_pids  # noqa: E402


def test_session_pids_sees_this_process() -> None:
    """The clean-up's process finder is real: it finds this pytest process in its session."""
    import os

    assert os.getpid() in session_pids(os.getsid(0))
