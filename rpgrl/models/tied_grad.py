"""One dense gradient for a tied input/output embedding, added to in place.

A tied weight gets two gradients per backward: the LM head's, dense [V, H], and the input
lookup's, non-zero only on the rows of the tokens seen. nn.Embedding's dense backward
zero-fills a [V, H] buffer for those few rows (113 MB at V = 49k, H = 576); its sparse
backward avoids the fill, but autograd then sums the two with an out-of-place ``dense +
sparse``: a fresh [V, H] copy of the head's gradient, ~60 ms per micro-step on one CPU
thread (docs/benchmarks.md, section 5).

Here the head's backward hands its dense gradient to the lookup (:class:`HeadGrad`), and
the lookup's backward adds its sparse rows into it in place and returns the sum: one dense
gradient reaches the weight, no fill, no copy. The numbers are those of ``dense + sparse``
(the same kernel, in place). The lookup's backward always runs after the head's (the head
reads the decoder's output, which reads the lookup's); a lookup whose handed-over gradient is
already taken -- a second decoder call in the same forward -- returns its sparse rows, which
autograd adds as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["HeadGrad", "tied_embedding_grad"]


class HeadGrad:
    """The LM head's dense weight gradient, on its way to the tied lookup's backward."""

    __slots__ = ("grad",)

    def __init__(self) -> None:
        self.grad: Tensor | None = None


class _TiedLookup(torch.autograd.Function):
    """``F.embedding(ids, weight)`` whose weight gradient is the head's plus the lookup's rows."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, head):  # type: ignore[override]
        ctx.save_for_backward(ids)
        ctx.num_weights, ctx.padding_idx, ctx.head = weight.shape[0], padding_idx, head
        return torch.nn.functional.embedding(ids, weight, None if padding_idx < 0 else padding_idx)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        (ids,) = ctx.saved_tensors
        # nn.Embedding(sparse=True)'s backward: the lookup's rows as a sparse [V, H] tensor
        rows = torch.ops.aten.embedding_backward(grad_out, ids, ctx.num_weights, ctx.padding_idx, False, True)
        dense, ctx.head.grad = ctx.head.grad, None
        return None, (rows if dense is None else dense.add_(rows.to(dense.dtype))), None, None


@contextlib.contextmanager
def tied_embedding_grad(model: nn.Module, head: nn.Module, *, enabled: bool) -> Iterator[HeadGrad | None]:
    """While open, the input embedding of ``model`` (tied to ``head``) takes its gradient as
    described in the module docstring; yields the :class:`HeadGrad` the head's backward must
    fill, or None where this does not apply (``enabled`` false, no grad, untied, an embedding
    with max_norm or scale_grad_by_freq, not on CPU: there the dense path is cheap)."""
    emb = model.get_input_embeddings()
    use = (enabled and torch.is_grad_enabled() and isinstance(emb, nn.Embedding) and emb.max_norm is None
           and not emb.scale_grad_by_freq and emb.weight is head.weight and emb.weight.requires_grad
           and emb.weight.device.type == "cpu")
    if not use:
        yield None
        return
    head_grad, pad = HeadGrad(), -1 if emb.padding_idx is None else emb.padding_idx

    def lookup(module: nn.Embedding, args: tuple, _out: Tensor) -> Tensor:
        return _TiedLookup.apply(args[0], module.weight, pad, head_grad)

    hook = emb.register_forward_hook(lookup)
    try:
        yield head_grad
    finally:
        hook.remove()
