"""rpgrl.gguf: how model.path names a GGUF file (no model is loaded here; the real
SmolLM2 GGUF is de-quantized in tests/test_real_model.py)."""

from __future__ import annotations

import sys

import pytest

from rpgrl.config import ConfigError, load_config
from rpgrl.gguf import GGUFError, gguf_location, package_file, resolve_model_path


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
    from rpgrl.gguf import dequantize_gguf

    with pytest.raises(GGUFError, match=r"pip install 'rpgrl\[gguf\]'"):
        dequantize_gguf(f, cache_dir=str(tmp_path / "cache"), log=lambda *_: None)
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())
