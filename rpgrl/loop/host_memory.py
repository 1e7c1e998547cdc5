"""Keep freed host memory in the process instead of handing it back to the kernel (glibc).

Every micro-step of the update allocates and frees the same large buffers (activations,
[V, H]-sized gradients, LM-head chunks of 1024 x V logits). glibc serves blocks of 128 KiB and
more with ``mmap`` and returns them with ``munmap`` on free, so the next micro-step touches
fresh pages again and pays one minor page fault per 4 KiB. On the VMs we measure on a fault
is expensive and erratic (the same 113 MB zero-fill took 36 or 314 ms): one off-policy update
of the study's step faulted 483k times. With ``M_MMAP_MAX = 0`` large blocks come from the heap
and with a high ``M_TRIM_THRESHOLD`` the heap is not trimmed, so freed blocks are reused
without faults (12.9k faults, update 23.70 -> 21.87 s on the same batch; docs/benchmarks.md, section 5).
The same effect as ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` in the environment, which
PyTorch's CPU performance guide suggests, set by the trainer so that nobody has to know.

The cost: memory freed by the run stays mapped (the process's RSS does not shrink between
phases); its peak is what it allocates at once, as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["configure_host", "keep_freed_memory", "M_TRIM_THRESHOLD", "M_MMAP_MAX"]

#: glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: the trim threshold: mallopt takes a C int, so 2 GiB - 1 is the largest (the heap's top is
#: cut back only when more than that lies free there at once)
_NO_TRIM = 2**31 - 1


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from the heap and never trim it; True when
    it took effect (Linux with glibc), False elsewhere (macOS, musl, Windows: nothing done)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the trim threshold first so the heap is never cut back
    return mallopt(M_TRIM_THRESHOLD, _NO_TRIM) == 1 and mallopt(M_MMAP_MAX, 0) == 1


def configure_host(trainer) -> None:
    """The process settings a run asks for (``trainer.num_threads``, ``trainer.keep_freed_memory``
    on a CPU device), applied once before the model is built."""
    import torch

    from rpgrl.models.loading import resolve_device

    if trainer.num_threads:
        torch.set_num_threads(trainer.num_threads)
    if trainer.keep_freed_memory and resolve_device(trainer.device).type == "cpu":
        keep_freed_memory()
