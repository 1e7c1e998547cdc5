"""verl 0.9's real trainer (``python -m verl.trainer.main_ppo``) trains with an rpgrl loss on CPU.

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

import math
from pathlib import Path

import pytest

pytest.importorskip("verl", reason="verl is not installed (CI: pip install --no-deps 'verl==0.9.1', see .ci/run)")

from rpgrl.integrations.verl_cpu.run import RunResult, run, session_pids  # noqa: E402
from verl_runs import training_steps  # noqa: E402

pytestmark = [pytest.mark.verl_e2e, pytest.mark.medium]

#: The verl ``loss_mode`` under test (an rpgrl loss; "vanilla" must make this test fail).
LOSS_MODE = "rpg_ufkl"
STEPS = 2


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _check_run(res: RunResult) -> None:
    steps = training_steps(res, STEPS)
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
    after = _tensors(res.out / "ckpt" / f"global_step_{STEPS}" / "actor" / "huggingface" / "model.safetensors")
    assert set(after) == set(before)
    changed = {k: float((after[k].float() - before[k].float()).abs().max()) for k in before}
    assert all(math.isfinite(v) for v in changed.values())
    assert sum(v > 1e-3 for v in changed.values()) >= len(changed) // 2, changed


@pytest.mark.parametrize("trainer", ["legacy", "v1"])
def test_main_ppo_trains_rpg_on_cpu(tmp_path: Path, trainer: str) -> None:
    res = run(tmp_path / trainer, trainer=trainer, loss_mode=LOSS_MODE, steps=STEPS, timeout_s=1800)
    _check_run(res)


def test_session_pids_sees_this_process() -> None:
    """The clean-up's process finder is real: it finds this pytest process in its session."""
    import os

    assert os.getpid() in session_pids(os.getsid(0))
