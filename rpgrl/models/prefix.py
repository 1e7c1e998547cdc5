"""Shared prompts: each distinct prompt of a batch goes through the decoder once.

GRPO-style rollouts hold ``n`` responses per prompt (the paper's G = 16, docs/math.md §7; 8 by default), so a plain padded
forward recomputes every prompt ``n`` times -- in generation and again in every log-prob /
training pass. Under causal attention a prompt's keys and values do not depend on what
follows it, so running the distinct prompts once, keeping their KV cache, and indexing that
cache per response yields the same hidden states for the response tokens. Autograd sums
the ``n`` responses' gradients into the one shared prefix, so log-probs *and* gradients are
those of the padded forward (tests/test_prefix.py checks both to float64 round-off) for
1/n of the prompt FLOPs.

Only models whose default cache is HF's ``DynamicCache`` qualify (standard and
sliding-window attention; not recurrent/hybrid state), and not with gradient checkpointing
while training (HF then turns the cache off). Callers fall back to the padded forward
whenever :func:`can_share` says no or a batch has no repeated prompt.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["unwrap", "can_share", "dedupe_rows", "new_cache", "positions", "call_with_cache", "last_hidden",
           "SharedPrompts", "encode_prompts", "fork_cache", "response_hidden"]


def positions(mask: Tensor) -> Tensor:
    """Position ids of a left-padded row: 0 at its first real token (pads clamp to 0)."""
    return (mask.long().cumsum(-1) - 1).clamp_(min=0)


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside a PEFT wrapper (its layers carry the adapters), else ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def can_share(model: nn.Module) -> bool:
    """Whether ``model``'s KV cache can be built once and indexed per response."""
    base = unwrap(model)
    checkpointing = getattr(base, "is_activation_checkpointing", None)  # transformers 5 name
    if checkpointing is None:
        checkpointing = getattr(base, "is_gradient_checkpointing", False)
    if torch.is_grad_enabled() and base.training and checkpointing:
        return False
    supports = getattr(type(base), "_supports_default_dynamic_cache", None)
    if callable(supports) and not supports():
        return False
    try:
        new_cache(base)
    except Exception:  # an exotic config the cache cannot describe: use the padded forward
        return False
    return True


def new_cache(model: nn.Module):
    """An empty ``DynamicCache`` laid out for ``model`` (sliding layers included)."""
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    try:
        return DynamicCache(config=config)
    except TypeError:  # transformers versions whose DynamicCache takes no config
        return DynamicCache()


@functools.cache
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def call_with_cache(module: nn.Module, cache, *, keep_last: bool = False, **inputs):
    """``module(**inputs)`` with ``cache`` under the keyword this transformers version uses
    (``cache`` from 5.2x on, ``past_key_values`` before); ``keep_last`` asks a causal LM for
    the last position's logits only (``logits_to_keep=1``) where its forward takes it."""
    params = _forward_params(type(module))
    extra = {"cache" if "cache" in params else "past_key_values": cache}
    if keep_last and "logits_to_keep" in params:
        extra["logits_to_keep"] = 1
    return module(**inputs, use_cache=True, **extra)


def first_real_column(mask: Tensor, limit: int) -> int:
    """The first column of a left-padded block that is real in some row, at most ``limit``:
    columns before it are padding in every row and can be dropped (pads are masked keys and
    do not move ``cumsum(mask) - 1`` positions)."""
    real = mask.bool().any(0).nonzero()
    return min(int(real[0]) if real.numel() else limit, limit)


def has_repeats(ids: Tensor, mask: Tensor) -> bool:
    """Whether some row of a prompt block repeats (then sharing its KV saves work)."""
    return dedupe_rows(ids, mask) is not None


def dedupe_rows(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """(unique ids, their mask, inverse index) of the rows of a left-padded prompt block, or
    None when no row repeats (sharing would only add a second decoder call)."""
    rows = torch.cat([ids, mask.to(ids.dtype)], dim=1)
    uniq, inverse = torch.unique(rows, dim=0, return_inverse=True)
    if uniq.shape[0] == rows.shape[0]:
        return None
    width = ids.shape[1]
    return uniq[:, :width], uniq[:, width:].to(mask.dtype), inverse


def _index_cache(cache, index: Tensor) -> None:
    """Rows ``index`` of every layer's keys/values, with ``index_select``: its backward
    (index_add) sums a prompt's n gradients in a fixed order, whereas advanced indexing's
    (``cache.batch_select_indices``; index_put with accumulate) is not deterministic on CPU
    with repeated indices, which made runs differ in the last bits."""
    layers = getattr(cache, "layers", None)
    if layers is None:  # older transformers: no per-layer objects to reach into
        cache.batch_select_indices(index)
        return
    for layer in layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)


def fork_cache(cache, index: Tensor):
    """A new cache holding rows ``index`` of ``cache`` (which is left untouched), for one of
    several response buckets that continue the same prompts (``index_select``: see
    :func:`_index_cache`; autograd sums every bucket's gradient into the shared prompt KV)."""
    fork = copy.copy(cache)
    fork.layers = [copy.copy(layer) for layer in cache.layers]
    _index_cache(fork, index)
    return fork


def last_hidden(out) -> Tensor:
    """The final hidden states of a decoder's output (ModelOutput or tuple)."""
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@dataclass
class SharedPrompts:
    """The distinct prompts of a batch, run once: their KV cache, the hidden state of each
    prompt's last column (it predicts the first response token) and each row's prompt."""

    cache: object  # DynamicCache over the U distinct prompts, width ``width``
    last: Tensor  # [U, H]
    inverse: Tensor  # [B] row -> distinct prompt
    offset: int  # all-pad left columns dropped: the cache covers prompt columns offset..P-1


def encode_prompts(decoder: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor) -> SharedPrompts | None:
    """Run each distinct row of a left-padded prompt block [B, P] through ``decoder`` once.

    Columns that are padding in every row are dropped first (positions are ``cumsum(mask) - 1``
    and pads are masked keys, so nothing else changes). Returns None when the decoder kept no
    KV (a cache-less variant): the caller then runs the padded forward.
    """
    offset = first_real_column(prompt_mask, prompt_ids.shape[1] - 1)
    ids, mask = prompt_ids[:, offset:], prompt_mask[:, offset:]
    found = dedupe_rows(ids, mask)
    if found is None:
        uniq_ids, uniq_mask, inverse = ids, mask, torch.arange(ids.shape[0], device=ids.device)
    else:
        uniq_ids, uniq_mask, inverse = found
    cache = new_cache(decoder)
    out = call_with_cache(decoder, cache, input_ids=uniq_ids, attention_mask=uniq_mask,
                          position_ids=positions(uniq_mask))
    if cache.get_seq_length() != ids.shape[1]:
        return None
    return SharedPrompts(cache, last_hidden(out)[:, -1], inverse, offset)


def response_hidden(decoder: nn.Module, shared: SharedPrompts, rows: Tensor, input_ids: Tensor,
                    attention_mask: Tensor, prompt_len: int, width: int) -> Tensor:
    """[len(rows), width, H]: the hidden states that predict response columns 0..width-1 of
    ``rows`` (layout of ``rpgrl.models.logprobs.sequence_logprobs``), continuing the shared prompts'
    cache -- equal to the padded forward's columns P-1 .. P+width-2 of those rows. Columns
    past ``width`` are never run: under causal attention they cannot change these."""
    P = prompt_len
    which = shared.inverse.index_select(0, rows)
    first = shared.last.index_select(0, which)[:, None]  # predicts response column 0
    if width == 1:
        return first
    cache = fork_cache(shared.cache, which)
    ids = input_ids.index_select(0, rows)
    mask = attention_mask.index_select(0, rows)
    prompt_mask, response_mask = mask[:, shared.offset:P], mask[:, P:P + width - 1]
    response_pos = prompt_mask.long().sum(1, keepdim=True) + response_mask.long().cumsum(-1) - 1
    out = call_with_cache(decoder, cache, input_ids=ids[:, P:P + width - 1],
                          attention_mask=mask[:, shared.offset:P + width - 1],
                          position_ids=response_pos.clamp_(min=0))
    return torch.cat([first, last_hidden(out)], dim=1)
