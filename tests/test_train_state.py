"""TrainState: what trainer_state.pt holds, saved and restored without a Trainer."""

from __future__ import annotations

import pytest
import torch

from rpgrl.algorithm.anchor import Anchor
from rpgrl.loop.checkpoint import CheckpointError, capture_rng_state
from rpgrl.loop.prompt_order import PromptOrder
from rpgrl.loop.train_state import STATE_KEYS, TrainState


def _state(seed: int = 3) -> TrainState:
    return TrainState(PromptOrder(10, seed), Anchor(mode="rollout"))


def test_round_trip_through_a_weights_only_file(tmp_path):
    a = _state()
    a.prompt_order.take(13)  # into the second epoch
    a.step, a.eval_before = 7, {"accuracy": 0.25, "secondary": {}}
    a.record_optimizer_step(False)
    a.record_optimizer_step(False)
    a.record_optimizer_step(True)
    a.record_optimizer_step(False)
    a.best_last.update(7, {"eval/accuracy": 0.5})
    a.anchor.observe(0.125)
    torch.save(a.state_dict(), tmp_path / "trainer_state.pt")
    expected_draw = torch.rand(3)
    saved = torch.load(tmp_path / "trainer_state.pt", weights_only=True)
    assert set(saved) == set(STATE_KEYS)

    b = _state()
    assert b.load_state_dict(saved) is True  # one process: its RNG state is restored
    assert torch.equal(torch.rand(3), expected_draw)
    assert (b.step, b.skipped_total, b.consecutive_skips) == (7, 3, 1)
    assert b.eval_before == {"accuracy": 0.25, "secondary": {}}
    assert b.best_last.to_dict() == a.best_last.to_dict()
    assert b.anchor.steps_since_refresh == 1 and b.anchor.kl_ema == 0.125
    assert b.prompt_order.take(4) == a.prompt_order.take(4)


def test_rng_per_rank_is_restored_only_for_the_same_world_size():
    states = []
    for seed in (11, 12):
        torch.manual_seed(seed)
        states.append(capture_rng_state())
    saved = _state().state_dict(rng_per_rank=states)
    torch.manual_seed(12)
    rank1_draw = torch.rand(2)
    assert _state().load_state_dict(saved, rank=1, world_size=2) is True
    assert torch.equal(torch.rand(2), rank1_draw)
    assert _state().load_state_dict(saved, rank=0, world_size=3) is False  # the caller reseeds


def test_a_state_missing_keys_names_the_file_and_the_expected_keys():
    saved = _state().state_dict()
    del saved["best_last"], saved["anchor"]
    with pytest.raises(CheckpointError, match=r"ckpt/trainer_state.pt: missing anchor, best_last; "
                                              r"a trainer state holds step, sampler, rng"):
        _state().load_state_dict(saved, source="ckpt/trainer_state.pt")
