"""rpgrl.models.layout: linear weights held column-major while sampling, restored after."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import tiny_causal_lm

from rpgrl.loop.generation import _decode, left_pad
from rpgrl.models.layout import decoding_layout
from rpgrl.models.tiny import build_tiny_tokenizer

TOK = build_tiny_tokenizer()


def _linears(model):
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_layout_changes_strides_only_and_is_restored(arch):
    model = tiny_causal_lm(arch, seed=0, vocab_size=len(TOK))
    weights = _linears(model)
    before = {id(w): w.detach().clone() for w in weights}
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    with decoding_layout(model) as n:
        assert n == len({id(w) for w in weights}) and n > 0  # the tied LM head counted once
        for w in weights:
            assert not w.is_contiguous() and w.t().is_contiguous()  # column-major
            assert torch.equal(w, before[id(w)])
        assert model.get_input_embeddings().weight.is_contiguous() != tied  # the tied table too
        ids = torch.tensor([[3, 4, 5]])
        with torch.no_grad():
            model(input_ids=ids)  # lookups and products work in that layout
    for w in _linears(model):
        assert w.is_contiguous() and torch.equal(w, before[id(w)])
    assert [id(w) for w in _linears(model)] == [id(w) for w in weights]  # the same Parameters


def test_a_weight_written_while_laid_out_keeps_the_write():
    """Leaving puts the row-major original back only for untouched weights: one written in place
    (as schedule-free's eval/train swap does) keeps the written values."""
    model = tiny_causal_lm("llama", seed=0, vocab_size=len(TOK))
    w = model.get_output_embeddings().weight
    other = model.model.layers[0].mlp.up_proj.weight
    want, other_before, ptr = 2 * w.detach().clone(), other.detach().clone(), other.data_ptr()
    with decoding_layout(model), torch.no_grad():
        w.mul_(2)
    assert w.is_contiguous() and torch.equal(w, want)
    assert other.is_contiguous() and torch.equal(other, other_before) and other.data_ptr() == ptr  # its original


def test_layout_is_restored_after_an_error_and_skips_other_dtypes():
    model = tiny_causal_lm("llama", seed=0, vocab_size=len(TOK))
    with pytest.raises(RuntimeError, match="boom"):
        with decoding_layout(model):
            raise RuntimeError("boom")
    assert all(w.is_contiguous() for w in _linears(model))
    with decoding_layout(model.double()) as n:  # measured for fp32 only: float64 keeps its layout
        assert n == 0
    with decoding_layout(model, enabled=False) as n:
        assert n == 0


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_sampling_in_the_layout_draws_the_same(arch):
    """The same tokens from the same random numbers, log-probs within float32 round-off."""
    model = tiny_causal_lm(arch, seed=0, vocab_size=len(TOK)).eval()
    ids, mask = left_pad([[5, 6, 7, 8], [5, 6, 9], [10, 11, 12, 13]], TOK.pad_token_id)
    common = dict(max_new_tokens=6, temperature=0.8, top_p=1.0, eos_ids=torch.tensor([TOK.eos_token_id]),
                  pad_id=TOK.pad_token_id, with_scores=True)
    runs = []
    for layout in (False, True):
        torch.manual_seed(7)
        with torch.no_grad(), decoding_layout(model, enabled=layout):
            runs.append(_decode(model, ids, mask, 4, **common))
    (tok_a, lp_a, ent_a), (tok_b, lp_b, ent_b) = runs
    assert torch.equal(tok_a, tok_b)
    torch.testing.assert_close(lp_a, lp_b, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent_a, ent_b, rtol=0, atol=1e-5)


def test_the_sampler_lays_out_fp32_only():
    """Under bf16 autocast (mixed precision) autocast casts every weight per call: no layout."""
    import contextlib
    import functools

    from rpgrl.loop.generation import Sampler

    model = tiny_causal_lm("llama", seed=0, vocab_size=len(TOK))
    with Sampler(model, TOK, compute=contextlib.nullcontext).decoding() as n:
        assert n == len(_linears(model))
    bf16 = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    with Sampler(model, TOK, compute=bf16).decoding() as n:
        assert n == 0
