"""Kill-safe checkpoints: exact resume, fault injection, retention, RNG round trip."""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

from rpgrl.loop.checkpoint import (
    CheckpointError,
    capture_rng_state,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from rpgrl.loop.optim import build_optimizer, eval_mode, set_train_mode


class TiedLM(torch.nn.Module):
    """Tiny LM with tied input/output embeddings and dropout (consumes the torch RNG)."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.mid = torch.nn.Linear(dim, dim)
        self.drop = torch.nn.Dropout(0.3)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.tanh(self.mid(self.emb(x)))))


def make(seed: int, name: str = "adamw"):
    torch.manual_seed(seed)
    model = TiedLM().double()
    opt, sched = build_optimizer(model, name, lr=0.05, weight_decay=0.1, warmup_steps=3)
    return model, opt, sched


def train_step(model, opt, sched) -> None:
    """Data from all three RNGs, so an RNG that is not restored changes the result."""
    x = torch.randint(0, 11, (4, 5))
    y = (x + random.randint(0, 3) + int(np.random.randint(0, 3))) % 11
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def state_for(sched, **extra) -> dict:
    return {"rng": capture_rng_state(), "scheduler": None if sched is None else sched.state_dict(), **extra}


# ----------------------------------------------------------------------------- exact resume
def test_round_trip_adamw_continues_identically(tmp_path):
    model, opt, sched = make(0)
    seed_all(1)
    for _ in range(2):
        train_step(model, opt, sched)
    path = save_checkpoint(tmp_path, 2, model, opt, state_for(sched, data_pos=8))
    for _ in range(3):
        train_step(model, opt, sched)
    reference = params(model)

    model2, opt2, sched2 = make(123)  # different init: everything must come from the checkpoint
    seed_all(999)
    assert find_latest_checkpoint(tmp_path) == path
    state = load_checkpoint(path, model2, opt2)
    assert state["step"] == 2 and state["data_pos"] == 8
    sched2.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])
    assert model2.head.weight is model2.emb.weight  # tie survives loading
    for _ in range(3):
        train_step(model2, opt2, sched2)
    resumed = params(model2)
    assert reference.keys() == resumed.keys()
    for k in reference:
        assert torch.equal(reference[k], resumed[k]), k
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_round_trip_schedulefree_saved_in_eval_mode(tmp_path):
    model, opt, _ = make(0, "schedulefree_adamw")
    seed_all(1)
    for _ in range(2):
        train_step(model, opt, None)
    with eval_mode(opt):  # uninterrupted run: eval -> save -> train, like the trainer
        eval_weights = params(model)
        path = save_checkpoint(tmp_path, 2, model, opt, state_for(None))
    for _ in range(3):
        train_step(model, opt, None)
    reference = params(model)

    model2, opt2, _ = make(7, "schedulefree_adamw")
    state = load_checkpoint(path, model2, opt2)
    assert opt2.param_groups[0]["train_mode"] is False  # mode travels with the optimizer state
    for k, v in params(model2).items():
        assert torch.equal(v, eval_weights[k]), k  # the file holds the eval-mode (x) weights
    assert "z" in opt2.state[model2.mid.weight]
    restore_rng_state(state["rng"])
    set_train_mode(opt2)
    for _ in range(3):
        train_step(model2, opt2, None)
    for k, v in params(model2).items():
        assert torch.equal(v, reference[k]), k


# ----------------------------------------------------------------------------- fault injection
def _three_checkpoints(tmp_path):
    model, opt, sched = make(0)
    return [save_checkpoint(tmp_path, s, model, opt, {"s": s}, keep_last=10) for s in (1, 2, 3)]


def _truncate(path):
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    return "size"


def _flip_byte(path):
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    return "sha256"


def _drop_manifest(path):
    (path / "manifest.json").unlink()
    return "manifest missing"


def _drop_trainer_state(path):
    (path / "trainer_state.pt").unlink()
    return "missing"


def _edit_manifest(path, edit):
    m = json.loads((path / "manifest.json").read_text())
    edit(m["files"])
    (path / "manifest.json").write_text(json.dumps(m))


def _entry_not_a_dict(path):
    _edit_manifest(path, lambda files: files.update({"model.safetensors": 123}))
    return "'model.safetensors' is int"


def _entry_without_size(path):
    _edit_manifest(path, lambda files: files["trainer_state.pt"].pop("size"))
    return "'trainer_state.pt' has size None"


def _entry_without_sha256(path):
    _edit_manifest(path, lambda files: files["model.safetensors"].pop("sha256"))
    return "'model.safetensors' has sha256 None"


def _entry_escaping_dir(path):
    _edit_manifest(path, lambda files: files.update({"../x": files["model.safetensors"]}))
    return "not a plain file name"


@pytest.mark.parametrize("damage", [
    _truncate, _flip_byte, _drop_manifest, _drop_trainer_state,
    _entry_not_a_dict, _entry_without_size, _entry_without_sha256, _entry_escaping_dir,
])
def test_find_latest_falls_back_on_damaged_newest(tmp_path, damage):
    c1, c2, c3 = _three_checkpoints(tmp_path)
    what = damage(c3)
    with pytest.warns(RuntimeWarning, match=rf"step_000003.*{what}"):
        assert find_latest_checkpoint(tmp_path) == c2
    with pytest.raises(CheckpointError, match=what):
        load_checkpoint(c3, make(0)[0])


def test_all_damaged_returns_none_and_empty_dir(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    for c in _three_checkpoints(tmp_path):
        _truncate(c)
    with pytest.warns(RuntimeWarning):
        assert find_latest_checkpoint(tmp_path) is None


def test_load_into_wrong_model_names_file(tmp_path):
    model, opt, _ = make(0)
    path = save_checkpoint(tmp_path, 1, model, opt, {})
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(path, torch.nn.Linear(3, 3))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "checkpoints" / "step_000099", model)


def test_unloadable_trainer_state_rejected_before_writing(tmp_path):
    model, opt, _ = make(0)
    with pytest.raises(TypeError, match=r"trainer_state\['data'\]\['order'\].*ndarray"):
        save_checkpoint(tmp_path, 1, model, opt, {"data": {"order": np.arange(3)}})
    assert list_checkpoints(tmp_path) == []


def test_manifest_contents(tmp_path):
    model, opt, _ = make(0)
    path = save_checkpoint(tmp_path, 12, model, opt, {})
    assert path.name == "step_000012"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 12 and manifest["format_version"] == 1
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.pt", "trainer_state.pt"}
    for name, meta in manifest["files"].items():
        assert (path / name).stat().st_size == meta["size"]
        assert len(meta["sha256"]) == 64


# ----------------------------------------------------------------------------- retention / tmp dirs
def _steps(tmp_path):
    return sorted(int(p.name.split("_")[1].split(".")[0]) for p in list_checkpoints(tmp_path))


def test_retention_keeps_last_n(tmp_path):
    model, opt, _ = make(0)
    for s in range(1, 6):
        save_checkpoint(tmp_path, s, model, opt, {}, keep_last=2)
    assert _steps(tmp_path) == [4, 5]


def test_retention_counts_only_good_checkpoints(tmp_path):
    c1, c2, c3 = _three_checkpoints(tmp_path)
    _truncate(c3)
    _drop_manifest(c2)
    model, opt, _ = make(0)
    save_checkpoint(tmp_path, 4, model, opt, {}, keep_last=2)
    assert _steps(tmp_path) == [1, 4]  # 2 and 3 could never be resumed from; 1 is the backup


def test_retention_never_deletes_newer_or_just_written(tmp_path):
    c1, c2, c3 = _three_checkpoints(tmp_path)
    _flip_byte(c3)  # the run resumed from step 2 because 3 was corrupt ...
    shutil.rmtree(c2)
    model, opt, _ = make(0)
    new = save_checkpoint(tmp_path, 2, model, opt, {"again": True}, keep_last=1)  # ... and saves again
    assert _steps(tmp_path) == [2, 3]
    with pytest.warns(RuntimeWarning, match="step_000003"):
        assert find_latest_checkpoint(tmp_path) == new


def test_resave_same_step_replaces_it(tmp_path):
    model, opt, _ = make(0)
    save_checkpoint(tmp_path, 2, model, opt, {"v": 1})
    path = save_checkpoint(tmp_path, 2, model, opt, {"v": 2})
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000002"]
    assert load_checkpoint(path, model)["v"] == 2


def test_tmp_dirs_ignored_and_cleaned(tmp_path):
    c1, c2, c3 = _three_checkpoints(tmp_path)
    stale = tmp_path / "checkpoints" / "step_000009.tmp-4242"  # a save killed before its rename
    shutil.copytree(c3, stale)
    assert find_latest_checkpoint(tmp_path) == c3
    model, opt, _ = make(0)
    save_checkpoint(tmp_path, 4, model, opt, {}, keep_last=10)
    assert not stale.exists()
    assert not any(".tmp-" in p.name for p in (tmp_path / "checkpoints").iterdir())


def test_aside_copy_found_if_killed_during_resave(tmp_path):
    c1, c2, c3 = _three_checkpoints(tmp_path)
    os.rename(c3, c3.with_name("step_000003.old-77"))  # killed between the two renames
    assert find_latest_checkpoint(tmp_path) == c3.with_name("step_000003.old-77")


# ----------------------------------------------------------------------------- RNG
def _draws(gen: torch.Generator):
    return (
        [random.random(), random.gauss(0, 1)],
        np.random.standard_normal(3).tolist(),
        torch.rand(3).tolist(),
        torch.rand(2, generator=gen).tolist(),
    )


def test_rng_round_trip_through_checkpoint(tmp_path):
    seed_all(5)
    gen = torch.Generator().manual_seed(11)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.standard_normal(1)  # ... and in NumPy's
    model, opt, _ = make(0)
    path = save_checkpoint(tmp_path, 1, model, opt, {"rng": capture_rng_state(gen)})
    first = _draws(gen)
    seed_all(0)
    gen.manual_seed(0)
    assert _draws(gen) != first
    restore_rng_state(load_checkpoint(path, model)["rng"], gen)  # weights_only=True load
    assert _draws(gen) == first


def test_restore_generator_without_entry_raises():
    with pytest.raises(KeyError, match="generator"):
        restore_rng_state(capture_rng_state(), torch.Generator())
