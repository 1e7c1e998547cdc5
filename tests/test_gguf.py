"""rpgrl.models.gguf: how model.path names a GGUF file, and the de-quantization cache (keyed by the
file's bytes, published atomically) on a tiny GGUF written here; the real SmolLM2 GGUF is
de-quantized in tests/test_real_model.py."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rpgrl.config import ConfigError, load_config
from rpgrl.models.gguf import GGUFError, dequantize_gguf, gguf_location, package_file, resolve_model_path


def quiet(*_):
    pass


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A real importable package on sys.path that ships a data file (never imported)."""
    pkg = tmp_path / "site" / "rpgrl_fake_weights"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('importing this package is not allowed')\n")
    (pkg / "sub" / "m.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return pkg


def test_package_file_is_found_without_importing_the_package(fake_package):
    assert package_file("pkg:rpgrl_fake_weights/sub/m.Q4_1.gguf") == fake_package / "sub" / "m.Q4_1.gguf"
    assert "rpgrl_fake_weights" not in sys.modules
    assert gguf_location("pkg:rpgrl_fake_weights/sub/m.Q4_1.gguf") == fake_package / "sub" / "m.Q4_1.gguf"


@pytest.mark.parametrize("spec, needle", [
    ("pkg:rpgrl_no_such_package/x.gguf", "is not installed"),
    ("pkg:rpgrl_fake_weights/missing.gguf", "has no file 'missing.gguf'"),
    ("pkg:rpgrl_fake_weights", "expected 'pkg:PACKAGE/relative/path'"),
])
def test_package_file_errors_name_what_is_missing(fake_package, spec, needle):
    with pytest.raises(GGUFError, match=needle):
        package_file(spec)


def test_gguf_location_forms(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    assert gguf_location(str(f)) == f
    assert gguf_location(str(tmp_path), "model.gguf") == f
    assert gguf_location(str(tmp_path)) is None  # a plain save_pretrained folder or hub name
    assert gguf_location("Qwen/Qwen3-4B") is None
    assert resolve_model_path("Qwen/Qwen3-4B") == "Qwen/Qwen3-4B"
    with pytest.raises(GGUFError, match="does not exist"):
        gguf_location(str(tmp_path), "other.gguf")
    with pytest.raises(GGUFError, match="does not exist"):
        gguf_location(str(tmp_path / "nope.gguf"))


def test_config_gguf_file_needs_a_path():
    with pytest.raises(ConfigError, match="model.gguf_file"):
        load_config(overrides=["model.gguf_file=m.gguf"])


def test_config_chat_task_needs_a_real_model():
    with pytest.raises(ConfigError, match="data.task"):
        load_config(overrides=["data.task=arith_chat"])
    with pytest.raises(ConfigError, match="data.task"):
        load_config(overrides=["model.path=/x", "data.task=nope"])
    with pytest.raises(ConfigError, match="data.operand_max"):
        load_config(overrides=["model.path=/x", "data.operand_min=5", "data.operand_max=4"])


def test_missing_gguf_package_names_the_extra(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # what `import gguf` sees when it is not installed

    with pytest.raises(GGUFError, match=r"pip install -e '\.\[gguf\]' in the rpgrl clone"):
        dequantize_gguf(f, cache_dir=str(tmp_path / "cache"), log=quiet)
    root = tmp_path / "cache" / "gguf"
    assert not root.exists() or [p.name for p in root.iterdir()] in ([], ["sha256-index.json"])


# -- the de-quantization cache ---------------------------------------------------------------

def write_tiny_gguf(path: Path, norm: float, seed: int = 0) -> None:
    """A loadable 1-layer llama GGUF (f32 tensors, byte-level BPE over 256 bytes + 3 specials +
    "hi"). Files written with different ``norm`` have the same size and differ only in the
    final norm's values, which the de-quantized model must carry."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    hidden, heads, kv_heads, ff = 16, 2, 1, 32
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values(), "hi"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["h i"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(len(tokens), hidden))
    w.add_tensor("output_norm.weight", np.full(hidden, norm, np.float32))
    w.add_tensor("output.weight", rand(len(tokens), hidden))
    kv = hidden // heads * kv_heads
    for name, shape in [("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)),
                        ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)), ("attn_output", (hidden, hidden)),
                        ("ffn_gate", (ff, hidden)), ("ffn_up", (ff, hidden)), ("ffn_down", (hidden, ff))]:
        w.add_tensor(f"blk.0.{name}.weight", np.ones(shape, np.float32) if len(shape) == 1 else rand(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def gguf_pair(tmp_path):
    """Two tiny GGUFs of the same size whose final norm is 1.0 and 2.0."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    src = tmp_path / "src"
    src.mkdir()
    a, b = src / "a.gguf", src / "b.gguf"
    write_tiny_gguf(a, norm=1.0)
    write_tiny_gguf(b, norm=2.0)
    assert a.stat().st_size == b.stat().st_size and a.read_bytes() != b.read_bytes()
    return a, b


def final_norm(folder: Path) -> set[float]:
    from safetensors.torch import load_file

    return set(load_file(str(folder / "model.safetensors"))["model.norm.weight"].tolist())


def test_new_bytes_with_the_same_size_and_restored_mtime_are_converted_again(tmp_path, gguf_pair):
    """``cp -p`` / ``rsync -t`` / ``tar`` keep size and mtime: the cache must still see new bytes,
    also when the old file's hash was remembered (same path, inode, size and mtime)."""
    a, b = gguf_pair
    model, cache = tmp_path / "m.gguf", str(tmp_path / "cache")
    shutil.copyfile(a, model)
    before = model.stat()
    # let the ctime age past rpgrl.models.gguf's 2 s settle window, so the hash of a's bytes is remembered
    time.sleep(max(0.0, 2.1 - (time.time_ns() - before.st_ctime_ns) / 1e9))
    first = dequantize_gguf(model, cache_dir=cache, log=quiet)
    assert final_norm(first) == {1.0}

    subprocess.run(["cp", "-p", str(b), str(model)], check=True)
    os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = model.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns  # the one thing cp -p cannot restore

    second = dequantize_gguf(model, cache_dir=cache, log=quiet)
    assert second != first
    assert final_norm(second) == {2.0}
    assert final_norm(first) == {1.0}  # a's conversion is untouched (content-addressed)
    logs = []
    assert dequantize_gguf(model, cache_dir=cache, log=logs.append) == second
    assert logs == [f"model: reusing de-quantized m.gguf from {second}"]
    # the shortcut was armed for a's bytes; b's bytes are remembered under b's ctime, if at all
    from rpgrl.models.gguf import _stat_id

    index = json.loads((tmp_path / "cache" / "gguf" / "sha256-index.json").read_text())
    assert index[f"{model.resolve()}|{_stat_id(before)}"] == hashlib.sha256(a.read_bytes()).hexdigest()
    assert index.get(f"{model.resolve()}|{_stat_id(after)}", "b") in ("b", hashlib.sha256(b.read_bytes()).hexdigest())
    assert len(index) in (1, 2)


def test_same_bytes_elsewhere_share_one_conversion_that_loads(tmp_path, gguf_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, _ = gguf_pair
    other = tmp_path / "elsewhere" / "a.gguf"
    other.parent.mkdir()
    shutil.copy2(a, other)
    cache = str(tmp_path / "cache")
    out = dequantize_gguf(a, cache_dir=cache, log=quiet)
    assert dequantize_gguf(other, cache_dir=cache, log=quiet) == out
    assert resolve_model_path(str(other), cache_dir=cache, log=quiet) == str(out)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # readable as the cache's other folders
    marker = json.loads((out / "rpgrl_gguf.json").read_text())
    assert marker["sha256"] == hashlib.sha256(a.read_bytes()).hexdigest()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.norm.weight.tolist() == [1.0] * 16
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("hi there")["input_ids"]
    assert ids[0] == 259 and tok.decode(ids) == "hi there"  # "hi" is the one merged token


def test_a_conversion_leaves_the_global_rng_where_it_was(tmp_path, gguf_pair):
    """Converting builds models with random initial weights; if that drew from torch's global RNG,
    the run that converts (the first on a machine) would sample other responses than the runs that
    find the folder cached. Round 1 of the real-model study had a broken seed pair from exactly
    that; both runs now draw the same first batch (docs/benchmarks.md, section 4)."""
    import torch

    a, _ = gguf_pair
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    dequantize_gguf(a, cache_dir=str(tmp_path / "cache"), log=quiet)  # converts
    assert torch.equal(torch.rand(4), want)
    torch.manual_seed(123)
    dequantize_gguf(a, cache_dir=str(tmp_path / "cache"), log=quiet)  # cached
    assert torch.equal(torch.rand(4), want)


def test_a_remembered_hash_is_trusted_only_for_the_same_file_state(tmp_path):
    from rpgrl.models.gguf import _stat_id, content_hash, file_sha256

    f, index = tmp_path / "m.gguf", tmp_path / "index.json"
    f.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    real = hashlib.sha256(f.read_bytes()).hexdigest()
    assert file_sha256(f) == real
    assert content_hash(f, index) == real
    assert not index.exists()  # a file written just now is not remembered yet
    index.write_text(json.dumps({f"{f.resolve()}|{_stat_id(f.stat())}": "remembered"}))
    assert content_hash(f, index) == "remembered"  # same state: the file is not read again
    os.chmod(f, 0o600)  # any change of the inode moves ctime
    assert content_hash(f, index) == real


def _publish_racer(root: str, names: list[str], who: int, barrier, results) -> None:
    """Publish one folder per name; hold just before the rename until every racer is there.

    The hold is a trace hook on the ``os.replace(tmp, out)`` line of ``publish_dir``: it makes
    the worst interleaving (everyone past any earlier check, nobody renamed yet) happen every
    time instead of once in thousands of runs.
    """
    import inspect

    from rpgrl.models.gguf import publish_dir

    lines, first = inspect.getsourcelines(publish_dir)
    rename_lines = {first + k for k, text in enumerate(lines) if "os.replace(tmp, out)" in text}
    assert rename_lines, "publish_dir no longer renames tmp onto out"
    held = []

    def local(frame, event, arg):
        if event == "line" and frame.f_lineno in rename_lines and not held:
            held.append(True)
            barrier.wait(timeout=60)
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code is publish_dir.__code__ else None

    for name in names:
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=name + ".tmp-"))
        (tmp / "weights.bin").write_bytes(bytes([who]) * 65536)
        (tmp / "rpgrl_gguf.json").write_text(str(who))
        held.clear()
        sys.settrace(tracer)
        try:
            results.put((name, who, str(publish_dir(tmp, Path(root) / name))))
        except BaseException as exc:  # noqa: BLE001  (reported to the parent, which fails)
            results.put((name, who, repr(exc)))
        finally:
            sys.settrace(None)


def test_concurrent_publishes_all_get_one_complete_folder(tmp_path):
    """Processes finishing the same conversion at once: the first rename wins, the others use
    its folder (a directory cannot be renamed onto a non-empty one), no temporary is left."""
    ctx = multiprocessing.get_context("fork")
    racers, names = 4, [f"m-{i}" for i in range(3)]
    barrier, results = ctx.Barrier(racers), ctx.Queue()
    procs = [ctx.Process(target=_publish_racer, args=(str(tmp_path), names, who, barrier, results))
             for who in range(racers)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in range(racers * len(names))]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(got) == sorted((name, who, str(tmp_path / name)) for name in names for who in range(racers))
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    for name in names:
        winner = int((tmp_path / name / "rpgrl_gguf.json").read_text())
        assert (tmp_path / name / "weights.bin").read_bytes() == bytes([winner]) * 65536


def test_an_incomplete_folder_is_replaced_not_reused(tmp_path):
    from rpgrl.models.gguf import is_complete, publish_dir

    out = tmp_path / "m-0123"
    out.mkdir()
    (out / "config.json").write_text("{}")  # e.g. a copy cut short: no completion marker
    tmp = tmp_path / "m-0123.tmp-x"
    tmp.mkdir()
    (tmp / "rpgrl_gguf.json").write_text("{}")
    assert not is_complete(out)
    assert publish_dir(tmp, out) == out
    assert sorted(p.name for p in out.iterdir()) == ["rpgrl_gguf.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["m-0123"]


def _convert(file: str, cache: str, results) -> None:
    try:
        results.put(str(dequantize_gguf(file, cache_dir=cache, log=quiet)))
    except BaseException as exc:  # noqa: BLE001
        results.put(repr(exc))


def test_two_processes_converting_the_same_file_share_the_result(tmp_path, gguf_pair):
    import transformers  # noqa: F401  (imported before the fork, so the children start converting at once)

    a, _ = gguf_pair
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_convert, args=(str(a), str(cache), results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    out = dequantize_gguf(a, cache_dir=str(cache), log=quiet)
    assert got == [str(out), str(out)]
    left = sorted(p.name for p in (cache / "gguf").iterdir() if p.name != "sha256-index.json")
    assert left == [out.name]  # no temporaries
    assert final_norm(out) == {1.0}
