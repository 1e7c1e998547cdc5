"""Linear weights laid out for decoding: column-major while the sampler runs on CPU.

``F.linear(x, W)`` multiplies ``x`` by ``W^T``. Stored row-major ([out, in], as torch allocates
it and as the update's matmuls want it), ``W^T`` is a transposed view, and at decoding's few
rows per call (M <= 64 live sequences) the CPU BLAS runs SmolLM2's block products mostly
1.1-2.5x faster with ``W^T`` contiguous, bitwise equal at M = 64 and 32; a whole sampling round
of the study's step runs 1.13x faster (docs/benchmarks.md, section 5). Holding each weight
column-major (``W^T`` contiguous, ``W`` a transposed view of it) while sampling makes every
linear that plain product. The values are untouched; only the order of float sums inside a
product may change.

The row-major tensors are kept aside meanwhile and put back on exit, so leaving costs nothing
unless a weight was written in its column-major form (then it is copied back). Entering copies
every weight (~0.3 s for 135M parameters on one thread) and holds a second copy while open, so
the trainer does it once per collect phase (every dynamic-sampling round of a step, with the
last update's gradients already freed) and once per evaluation, not per call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["decoding_layout"]


def _eligible(p: torch.Tensor) -> bool:
    """A plain fp32 CPU matrix in the default layout (not a DTensor shard, not already swapped):
    the case measured; GPUs and bf16 kernels keep their own layouts."""
    return (type(p.data) is torch.Tensor and p.device.type == "cpu" and p.dtype == torch.float32
            and p.dim() == 2 and p.is_contiguous())


@contextlib.contextmanager
def decoding_layout(model: nn.Module, *, enabled: bool = True) -> Iterator[int]:
    """While open, every ``nn.Linear`` weight of ``model`` eligible for it is held column-major
    (the module docstring); yields how many. Row-major again on exit, exceptions included; a
    weight written in place through the parameter (an optimizer's eval/train swap) or given
    new data meanwhile keeps what it holds then (writes through ``.data`` are not seen).
    A weight tied to an input embedding is laid out too: its lookups become strided row
    gathers, ~0.3 ms for 64 rows of a [49152, 576] table."""
    swapped: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor, int]] = []
    seen: set[int] = set()
    try:
        if enabled:
            for module in model.modules():
                w = getattr(module, "weight", None)
                if isinstance(module, nn.Linear) and isinstance(w, torch.Tensor) and id(w) not in seen and _eligible(w):
                    seen.add(id(w))
                    row = w.data
                    w.data = row.t().contiguous().t()
                    swapped.append((w, row, w.data_ptr(), w._version))
        yield len(swapped)
    finally:
        for w, row, ptr, version in swapped:
            if w.data_ptr() == ptr and w._version == version:  # untouched: the row-major original holds it
                w.data = row
            else:  # written in place or replaced meanwhile: keep what it holds now, row-major
                w.data = w.data.contiguous()
