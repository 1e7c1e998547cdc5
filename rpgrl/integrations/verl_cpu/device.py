"""``torch.<device>``-like namespace for the CPU platform (``PlatformCPU.device_module``).

verl calls ``get_torch_device().<fn>`` for CUDA-style device management (empty_cache,
mem_get_info, rng state, ...). ``torch.cpu`` has only some of these; the rest are no-ops or
the host equivalents here, so verl's training path runs unchanged on CPU.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.cpu import (  # noqa: F401  (re-exported: verl calls them on the device module)
    Event,
    Stream,
    current_device,
    current_stream,
    device_count,
    is_available,
    set_device,
    stream,
    synchronize,
)


def empty_cache() -> None:
    """No device cache on CPU."""


def ipc_collect() -> None:
    """No CUDA IPC on CPU."""


def set_per_process_memory_fraction(fraction: float, device: Any = None) -> None:
    """No device memory pool on CPU."""


def mem_get_info(device: Any = None) -> tuple[int, int]:
    """(free, total) host memory in bytes (verl logs it as 'GPU memory')."""
    import os

    pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    free = os.sysconf("SC_AVPHYS_PAGES") * page
    return free, pages * page


def memory_allocated(device: Any = None) -> int:
    return 0


memory_reserved = max_memory_allocated = max_memory_reserved = memory_allocated


def get_device_name(device: Optional[int] = None) -> str:
    return "cpu"


def get_rng_state(device: Any = None) -> torch.Tensor:
    return torch.get_rng_state()


def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
    torch.set_rng_state(state)


def manual_seed(seed: int) -> None:
    torch.manual_seed(seed)


manual_seed_all = manual_seed
