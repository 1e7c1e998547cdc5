"""Kill-safe checkpoints: atomic save, verified load, keep-last-N retention, RNG state.

A run of Algorithm 2 (docs/math.md §7: 400 steps of generate + 16 off-policy updates) is long
enough to be killed; resuming must continue *exactly* where it stopped and must never
lose the last good checkpoint. Layout::

    <output_dir>/checkpoints/step_000012/
        model.safetensors   weights (safetensors; tied weights stored once)
        optimizer.pt        optimizer.state_dict()
        trainer_state.pt    step, data position, RNG states, LR-scheduler state, extras
        manifest.json       written LAST: file names, sizes, sha256, step, format version

Why it is safe:

* Everything is written into ``step_000012.tmp-<pid>``; each file and the directory are
  fsynced, then the directory is atomically renamed and the parent fsynced. A reader
  never sees a half-written ``step_*`` directory from this code.
* ``find_latest_checkpoint`` still verifies sizes and sha256 against the manifest, so
  damage from outside (disk full, a copy cut short, bit rot) falls back to the previous
  checkpoint with a warning instead of resuming from garbage.
* Loading is safe: safetensors for weights and ``torch.load(weights_only=True)`` for the
  rest, which is why RNG states are stored as tensors and plain types.

Schedule-Free AdamW (``schedulefree.AdamWScheduleFree``): the model weights differ between
its train mode (y) and eval mode (x); the mode is recorded in the optimizer's
``param_groups`` so weights and optimizer state are consistent whichever mode the
checkpoint was saved in. rpgrl's trainer saves in train mode (``model.safetensors`` then
holds the train iterate y; ``final/`` is written in eval mode and holds x), loads in train
mode, and a resumed run is bit-identical to an uninterrupted one (tests/test_reliability.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

__all__ = [
    "CheckpointError",
    "FORMAT_VERSION",
    "capture_rng_state",
    "checkpoint_dir",
    "find_latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "verify_checkpoint",
]

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"
_STEP_RE = re.compile(r"^step_(\d+)$")
_ASIDE_RE = re.compile(r"^step_(\d+)\.old-\d+$")  # a same-step checkpoint being replaced
_TMP_RE = re.compile(r"^step_\d+\.tmp-\d+$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt (the message names file and problem)."""


# --------------------------------------------------------------------------- helpers
def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    """``<output_dir>/checkpoints``: where all step directories live."""
    return Path(output_dir) / "checkpoints"


def _step_name(step: int) -> str:
    return f"step_{step:06d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_SAFE_SCALARS = (type(None), bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.device)


def _check_weights_only(obj: Any, where: str) -> None:
    """Fail at *save* time on what ``torch.load(weights_only=True)`` would refuse at resume."""
    if isinstance(obj, _SAFE_SCALARS):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"trainer_state key {where}[{k!r}] must be str or int, got {type(k).__name__}")
            _check_weights_only(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_weights_only(v, f"{where}[{i}]")
        return
    hint = " (convert numpy arrays with torch.from_numpy or .tolist())" if isinstance(obj, np.ndarray) else ""
    raise TypeError(
        f"trainer_state value {where} has type {type(obj).__name__}, which "
        f"torch.load(weights_only=True) cannot read back; use tensors, numbers, str, "
        f"lists, tuples or dicts{hint}"
    )


def _parse_step(name: str) -> tuple[int, int] | None:
    """(step, priority) for a checkpoint directory name; priority 1 = normal, 0 = aside copy."""
    if m := _STEP_RE.match(name):
        return int(m.group(1)), 1
    if m := _ASIDE_RE.match(name):
        return int(m.group(1)), 0
    return None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """All finished-name checkpoint directories, newest first (unverified; tmp dirs excluded)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(key, p) for p in root.iterdir() if p.is_dir() and (key := _parse_step(p.name))]
    return [p for _, p in sorted(found, key=lambda kp: kp[0], reverse=True)]


# --------------------------------------------------------------------------- verification
def _read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST_FILE
    if not mpath.is_file():
        raise CheckpointError(f"{mpath}: manifest missing (checkpoint incomplete)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{mpath}: manifest unreadable ({e})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{mpath}: manifest has no 'files' table")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{mpath}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    # Validate every entry here so a damaged manifest is a CheckpointError (and resume
    # falls back one checkpoint) rather than a bare KeyError/TypeError in verification.
    for name, meta in manifest["files"].items():
        if not name or name != Path(name).name or name in (".", ".."):
            raise CheckpointError(f"{mpath}: files entry {name!r} is not a plain file name")
        if not isinstance(meta, dict):
            raise CheckpointError(
                f"{mpath}: files entry {name!r} is {type(meta).__name__}, expected "
                "{'size': int, 'sha256': str}"
            )
        size, digest = meta.get("size"), meta.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise CheckpointError(f"{mpath}: files entry {name!r} has size {size!r}, expected an int >= 0")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise CheckpointError(
                f"{mpath}: files entry {name!r} has sha256 {digest!r}, expected 64 lowercase hex digits"
            )
    return manifest


def verify_checkpoint(path: str | os.PathLike, *, hashes: bool = True) -> dict:
    """Check a checkpoint directory against its manifest; return the manifest.

    ``hashes=False`` checks presence and sizes only (cheap; used by retention).
    Raises :class:`CheckpointError` naming the file and what is wrong.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    manifest = _read_manifest(path)
    for required in (MODEL_FILE, TRAINER_STATE_FILE):
        if required not in manifest["files"]:
            raise CheckpointError(f"{path / MANIFEST_FILE}: does not list {required}")
    for name, meta in manifest["files"].items():
        fpath = path / name
        if not fpath.is_file():
            raise CheckpointError(f"{fpath}: listed in manifest but missing")
        size = fpath.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"{fpath}: size {size} bytes, manifest says {meta['size']} (truncated?)")
        if hashes and (digest := _sha256(fpath)) != meta["sha256"]:
            raise CheckpointError(
                f"{fpath}: sha256 {digest[:12]}... does not match manifest {meta['sha256'][:12]}... (corrupt)"
            )
    return manifest


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """Newest checkpoint that passes full verification, or None.

    Invalid newer checkpoints are skipped with a ``warnings.warn`` naming the directory
    and the failure, so a run killed mid-copy or a damaged disk falls back one step.
    """
    for path in list_checkpoints(output_dir):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint {path}: {e}", RuntimeWarning, stacklevel=2)
            continue
        return path
    return None


# --------------------------------------------------------------------------- save
def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict,
    *,
    keep_last: int = 3,
) -> Path:
    """Atomically write ``checkpoints/step_<step>`` and apply keep-last-N retention.

    ``trainer_state`` should hold everything else needed to resume (data position,
    ``capture_rng_state()``, ``scheduler.state_dict()``...); ``step`` is added to it.
    It must be readable by ``torch.load(weights_only=True)``; this is checked *before*
    anything is written. Returns the final checkpoint directory.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    state = {**trainer_state, "step": int(step)}
    _check_weights_only(state, "trainer_state")

    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / _step_name(step)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    save_model(model, str(tmp / MODEL_FILE), metadata={"step": str(step)})
    names = [MODEL_FILE]
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        names.append(OPTIMIZER_FILE)
    torch.save(state, tmp / TRAINER_STATE_FILE)
    names.append(TRAINER_STATE_FILE)

    files = {}
    for name in names:
        _fsync_file(tmp / name)
        files[name] = {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    manifest = {"format_version": FORMAT_VERSION, "step": int(step), "created_unix": time.time(), "files": files}
    with open(tmp / MANIFEST_FILE, "w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)

    aside = None
    if final.exists():  # re-saving a step (e.g. after a resume): keep the old copy findable
        aside = root / f"{final.name}.old-{os.getpid()}"
        if aside.exists():
            shutil.rmtree(aside)
        os.rename(final, aside)
    os.rename(tmp, final)
    _fsync_dir(root)
    if aside is not None:
        shutil.rmtree(aside)

    _remove_stale_tmp(root, keep=final)
    _apply_retention(output_dir, final, step, keep_last)
    return final


def _remove_stale_tmp(root: Path, keep: Path) -> None:
    """Delete leftovers of killed saves (``*.tmp-*``; ``*.old-*`` once a newer valid copy exists)."""
    for p in root.iterdir():
        if p == keep or not p.is_dir():
            continue
        if _TMP_RE.match(p.name):
            shutil.rmtree(p, ignore_errors=True)
        elif (m := _ASIDE_RE.match(p.name)) and (root / _step_name(int(m.group(1)))).is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _apply_retention(output_dir: str | os.PathLike, just_written: Path, step: int, keep_last: int) -> None:
    """Keep the just-written checkpoint plus the newest ``keep_last - 1`` older good ones.

    Only checkpoints with a *lower* step than the one just written are candidates for
    deletion (newer ones belong to a timeline we resumed away from; we leave them alone).
    "Good" here is the cheap check (manifest present, sizes match); older checkpoints that
    fail it are deleted since they can never be resumed from. The just-written one is
    always kept, so the newest valid checkpoint is never deleted.
    """
    kept = 1
    for path in list_checkpoints(output_dir):
        key = _parse_step(path.name)
        if path == just_written or key is None or key[0] >= step:
            continue
        try:
            verify_checkpoint(path, hashes=False)
        except CheckpointError:
            shutil.rmtree(path, ignore_errors=True)
            continue
        if kept < keep_last:
            kept += 1
        else:
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- load
def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict:
    """Verify ``path`` fully, load weights (and optimizer state) in place, return trainer_state.

    A bad checkpoint raises :class:`CheckpointError` naming the file; use
    :func:`find_latest_checkpoint` to fall back automatically instead.
    """
    path = Path(path)
    manifest = verify_checkpoint(path)
    try:
        load_model(model, path / MODEL_FILE, strict=True)
    except (RuntimeError, OSError, ValueError) as e:
        raise CheckpointError(f"{path / MODEL_FILE}: does not fit the model ({e})") from e
    if optimizer is not None:
        if OPTIMIZER_FILE not in manifest["files"]:
            raise CheckpointError(f"{path}: has no {OPTIMIZER_FILE} but an optimizer was given")
        try:
            opt_state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
            optimizer.load_state_dict(opt_state)
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            raise CheckpointError(f"{path / OPTIMIZER_FILE}: cannot be loaded into the optimizer ({e})") from e
    try:
        return torch.load(path / TRAINER_STATE_FILE, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError) as e:
        raise CheckpointError(f"{path / TRAINER_STATE_FILE}: unreadable ({e})") from e


# --------------------------------------------------------------------------- RNG state
def capture_rng_state(generator: torch.Generator | None = None) -> dict:
    """Python ``random``, NumPy global, torch CPU/CUDA (and ``generator``) states as tensors.

    Everything is a tensor or plain type so it survives ``torch.load(weights_only=True)``.
    """
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if torch.cuda.is_available():
            cuda_states = state["cuda"][: torch.cuda.device_count()]
            for i, s in enumerate(cuda_states):
                torch.cuda.set_rng_state(s, i)
        else:
            warnings.warn("checkpoint has CUDA RNG states but CUDA is unavailable; not restored", RuntimeWarning)
    if generator is not None:
        if "generator" not in state:
            raise KeyError("RNG state has no 'generator' entry; capture it with capture_rng_state(generator)")
        generator.set_state(state["generator"])


def seed_all(seed: int) -> None:
    """Seed Python ``random``, NumPy's global generator and torch (every CUDA device too)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
