"""verl 0.9's real trainer (``python -m verl.trainer.main_ppo``) trains with an rpgrl loss on CPU.

End to end: Ray, verl's FSDP2 actor, the ``rpgrl_hf`` rollout, log-prob recomputation, the
``rpg`` advantage and an off-policy update (2 mini-batches x ppo_epochs=2) on a tiny local
Llama, through verl's extension points only (``rpgrl.integrations.verl_cpu``). The run takes
~2.5 (legacy) / ~4.5 (v1) minutes on 2 lightly loaded cores (12.5 minutes at load average 15),
almost all of it Ray and verl start-up. Both of verl's trainers are run.

It fails if the rpgrl loss is replaced by verl's ``vanilla`` loss: the ``actor/rpg/*``
metrics (and the clip fractions computed by rpgrl) are then absent.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("verl", reason="verl is not installed (CI: pip install --no-deps 'verl==0.9.1', see .ci/run)")

from rpgrl.integrations.verl_cpu.run import RunResult, run, session_pids  # noqa: E402

pytestmark = [pytest.mark.verl_e2e, pytest.mark.medium]

#: The verl ``loss_mode`` under test (an rpgrl loss; "vanilla" must make this test fail).
LOSS_MODE = "rpg_ufkl"
STEPS = 2


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _check_run(res: RunResult) -> None:
    assert res.returncode == 0, f"main_ppo failed (exit {res.returncode}); log tail:\n{res.log[-4000:]}"
    # Ray was shut down: nothing of the run's session is alive now.
    assert res.remaining_pids == [], f"processes survived the clean-up: {res.remaining_pids}"

    steps = [m for m in res.metrics if "actor/pg_loss" in m]
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1)), f"logged training steps: {res.metrics}"
    for m in steps:
        rpg = {k: v for k, v in m.items() if k.startswith("actor/rpg/")}
        assert rpg, f"step {m['step']}: no actor/rpg/* metrics (is the loss an rpgrl loss?); keys: {sorted(m)}"
        assert all(math.isfinite(v) for v in rpg.values()), rpg
        # Off-policy: after the first mini-batch update the policy moved, so w != 1 and the
        # RPG-Style clip / trust region fired (docs/math.md §3-4, Algorithm 1-2).
        assert m["actor/rpg/importance_weight_max"] > 1.05, rpg
        assert m["actor/rpg/kl_rollout_k3"] > 1e-4, rpg
        # verl's dashboard key is filled from rpgrl's own clip counts.
        assert m["actor/pg_clipfrac"] == pytest.approx(
            m["actor/rpg/clipfrac_upper"] + m["actor/rpg/clipfrac_lower"], abs=1e-6
        )
        assert math.isfinite(m["actor/pg_loss"]) and m["actor/pg_loss"] != 0.0
        assert 0 < m["actor/grad_norm"] < 1e3
        assert m["critic/score/max"] > m["critic/score/min"]  # rewards differ -> non-zero advantages
    clip = [m["actor/rpg/clipfrac_upper"] + m["actor/rpg/clipfrac_lower"] for m in steps]
    assert max(clip) > 0, f"the trust region never clipped: {clip}"

    # The policy's weights changed: verl's hf_model checkpoint vs the initial model.
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
