"""Kill-safety and failure handling of the whole trainer."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from informative import PREFIX_RANK, record_batches

from rpgrl.loop.checkpoint import find_latest_checkpoint, list_checkpoints
from rpgrl.config import load_config
from rpgrl.loop.tracking import read_metrics
from rpgrl.loop.trainer import Trainer, TrainingError

pytestmark = pytest.mark.medium


def _cli(overrides: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "rpgrl", "train", *overrides, *extra]


def _newest_step(run: Path) -> int:
    found = list_checkpoints(run)  # newest first
    return int(found[0].name.split("_")[1]) if found else 0


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


@pytest.mark.parametrize("optim", ["adamw", "schedulefree_adamw"])
def test_sigkill_then_resume_equals_uninterrupted(optim, tiny_overrides, tmp_path):
    steps = 6
    common = [f"optim.name={optim}", f"trainer.total_steps={steps}", "trainer.save_every=1", PREFIX_RANK]
    full, killed = tmp_path / "full", tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(_cli(tiny_overrides(*common, out=full)), check=True, env=env, capture_output=True)

    kill_after = random.Random(optim).randint(1, steps - 2)  # complete checkpoints before the kill
    proc = subprocess.Popen(_cli(tiny_overrides(*common, out=killed)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if _newest_step(killed) >= kill_after:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 1 <= _newest_step(killed) < steps

    out = subprocess.run(_cli(tiny_overrides(*common, out=killed), "--resume"), env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    a, b = _weights(full), _weights(killed)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    rows = [r["step"] for r in read_metrics(killed / "metrics.jsonl") if "actor/loss" in r]
    assert rows == list(range(1, steps + 1))  # continuous, no duplicates


def test_nan_gradients_are_skipped_and_counted(tiny_overrides, monkeypatch):
    seen = record_batches(monkeypatch)
    cfg = load_config(overrides=tiny_overrides("trainer.total_steps=4", PREFIX_RANK))
    t = Trainer(cfg, log=lambda *a: None)
    poisoned = {2}  # trainer steps (1-based) whose gradients become NaN
    param = next(t.model.parameters())
    param.register_hook(lambda g: g * float("nan") if t.state.step + 1 in poisoned else g)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.step()
    assert seen[0].first_update_has_signal, seen  # so step 1 moved the weights, whatever was drawn
    after_first = {k: v.clone() for k, v in t.model.state_dict().items()}
    metrics = t.step()  # both optimizer steps of this batch are non-finite
    assert metrics["actor/skipped_steps_total"] == 2
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, after_first[k]), f"{k} changed during a skipped step"
    assert any(not torch.equal(before[k], after_first[k]) for k in before)
    t.state.step = 2
    summary = t.train()  # the run goes on and ends normally
    assert summary["steps"] == 4 and summary["skipped_steps"] == 2


def test_consecutive_nans_stop_the_run_with_a_message(tiny_overrides, tmp_path):
    cfg = load_config(overrides=tiny_overrides("trainer.total_steps=6", "trainer.max_consecutive_skips=3",
                                               PREFIX_RANK))
    t = Trainer(cfg, log=lambda *a: None)
    param = next(t.model.parameters())
    param.register_hook(lambda g: g * float("nan") if t.state.step >= 2 else g)
    with pytest.raises(TrainingError) as info:
        t.train()
    msg = str(info.value)
    assert "3 consecutive optimizer steps had a non-finite loss or gradient" in msg
    assert "optim.lr" in msg and "checkpoints" in msg
    # step 3 skipped both its updates (weights unchanged, still saved); step 4 hit the limit.
    # The last checkpoint is intact, verified and finite.
    assert _newest_step(tmp_path / "run") == 3
    newest = find_latest_checkpoint(tmp_path / "run")
    assert newest is not None and newest.name == "step_000003"
    weights = load_file(newest / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_resume_skips_a_corrupt_newest_checkpoint(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    Trainer(load_config(overrides=tiny_overrides("trainer.total_steps=3")), log=lambda *a: None).train()
    newest = find_latest_checkpoint(run)
    assert newest.name == "step_000003"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a torn write
    with pytest.warns(RuntimeWarning, match="step_000003"):
        t = Trainer(load_config(overrides=tiny_overrides("trainer.total_steps=4")), resume=True,
                    log=lambda *a: None)
    assert t.state.step == 2  # fell back to the previous complete checkpoint
    assert t.train()["steps"] == 4
