"""Shared fixtures: a very small version of the CPU default for fast end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

#: The CPU default shrunk to seconds: 2-layer width-32 model, 4 prompts x 4 samples. fp32 is pinned:
#: ``model.dtype=auto`` picks bf16 mixed precision on AVX512-BF16/AMX CPUs and fp32 elsewhere, and no
#: test may depend on which CPU runs it (bf16 has its own tests, which force ``model.dtype=bfloat16``).
TINY_OVERRIDES = [
    "model.dtype=float32",
    "model.tiny.hidden_size=32", "model.tiny.num_layers=2", "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64", "warmstart.steps=30", "warmstart.batch_size=32",
    "rollout.n=4", "rollout.max_new_tokens=6", "trainer.prompts_per_step=4",
    "trainer.mini_batch_prompts=2", "trainer.micro_batch_sequences=4", "trainer.total_steps=2",
    "trainer.eval_every=0", "trainer.save_every=1", "data.test_size=16", "eval.max_problems=8",
    "logging.progress=false", "logging.tensorboard=false",
]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A width-32, 2-layer built-in tiny model + tokenizer as a save_pretrained folder."""
    from rpgrl.models.tiny import TinyModelConfig, build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def warmstart_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("warmstart-cache")


@pytest.fixture
def tiny_overrides(tmp_path, warmstart_cache):
    def make(*extra: str, out: Path | None = None) -> list[str]:
        return [*TINY_OVERRIDES, f"warmstart.cache_dir={warmstart_cache}",
                f"output_dir={out or tmp_path / 'run'}", *extra]

    return make
