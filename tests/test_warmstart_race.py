"""Two processes warm-starting the same tiny model at once: the one that renames second
keeps the first one's folder (it used to check, then rename, and could fail in between)."""

from __future__ import annotations

import os

import pytest

from rpgrl.data.procedural import addition_splits
from rpgrl.models import warmstart
from rpgrl.models.tiny import TinyModelConfig


def _start(tmp_path, log):
    train, _ = addition_splits(1, 9, test_size=4)
    return warmstart.warm_start_tiny(train, tiny=TinyModelConfig(), steps=0, batch_size=4, lr=1e-3, seed=0,
                                     cache_dir=str(tmp_path), log=log)


def test_losing_the_rename_race_keeps_the_winners_folder(tmp_path, monkeypatch):
    real_replace = os.replace
    winner = {}

    def racing_replace(src, dst):
        # the other process finishes between our save and our rename
        os.makedirs(dst)
        (open(os.path.join(dst, "config.json"), "w")).write("{}")
        winner["dst"] = dst
        return real_replace(src, dst)  # onto a non-empty folder: OSError, as on Linux

    monkeypatch.setattr(warmstart.os, "replace", racing_replace)
    out = _start(tmp_path, log=lambda *_: None)
    assert str(out) == str(winner["dst"])
    assert sorted(os.listdir(out)) == ["config.json"]  # the winner's, untouched
    assert not [p for p in os.listdir(out.parent) if ".tmp-" in p]  # our copy removed


def test_a_failed_rename_without_a_winner_is_raised(tmp_path, monkeypatch):
    def failing_replace(src, dst):
        raise PermissionError(13, "Permission denied", dst)

    monkeypatch.setattr(warmstart.os, "replace", failing_replace)
    with pytest.raises(PermissionError):
        _start(tmp_path, log=lambda *_: None)
