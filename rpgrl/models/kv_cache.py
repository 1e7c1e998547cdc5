"""A KV cache for decoding that writes in place instead of growing by concatenation.

HF's ``DynamicLayer.update`` is ``keys = torch.cat([keys, new])``: at every decoding step each
layer copies its whole cache into a fresh tensor (10 % of the study step's generation in the
profile, docs/benchmarks.md, section 5; plus the page faults of the fresh memory). rpgrl's
decoding loop knows how many tokens it may add (``max_new_tokens``), so each layer reserves that
room once and later steps write into it: the keys and values the attention sees are the same
numbers, as views of the buffer.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers.cache_utils import DynamicLayer

from rpgrl.models.prefix import new_cache

__all__ = ["ReservedLayer", "decoding_cache"]


class ReservedLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views of buffers with ``room`` tokens to spare; a
    buffer is re-allocated (with ``room`` more) only when an update does not fit."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room
        self._k: Tensor | None = None
        self._v: Tensor | None = None

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old, new = self.get_seq_length(), key_states.shape[-2]
        if self._k is None or old + new > self._k.shape[-2]:
            self._k = _grow(self.keys, key_states, old, old + new + self.room)
            self._v = _grow(self.values, value_states, old, old + new + self.room)
        self._k[..., old:old + new, :] = key_states
        self._v[..., old:old + new, :] = value_states
        self._view(old + new)
        return self.keys, self.values

    def _view(self, length: int) -> None:
        self.keys, self.values = self._k[..., :length, :], self._v[..., :length, :]

    def batch_repeat_interleave(self, repeats: int) -> None:
        length = self.get_seq_length()
        if length > 0:
            self._k, self._v = self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0)
            self._view(length)

    def batch_select_indices(self, indices: Tensor) -> None:
        length = self.get_seq_length()
        if length > 0:
            self._k, self._v = self._k[indices, ...], self._v[indices, ...]
            self._view(length)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)  # shorter views of the same buffers: later updates overwrite

    def reset(self) -> None:
        self._k = self._v = None
        super().reset()


def _grow(kept: Tensor, like: Tensor, length: int, capacity: int) -> Tensor:
    """A [..., capacity, D] buffer holding ``kept``'s first ``length`` positions."""
    buf = like.new_empty(*like.shape[:-2], capacity, like.shape[-1])
    if length:
        buf[..., :length, :] = kept
    return buf


def decoding_cache(model: nn.Module, room: int):
    """``new_cache(model)`` whose full-attention layers reserve ``room`` tokens (sliding-window
    and other kinds keep their own layers; a cache without per-layer objects stays as it is)."""
    cache = new_cache(model)
    layers = getattr(cache, "layers", None)
    for i, layer in enumerate(layers or []):
        if type(layer) is DynamicLayer:  # noqa: E721 - exactly the plain layer, not a subclass
            layers[i] = ReservedLayer(room)
    return cache
