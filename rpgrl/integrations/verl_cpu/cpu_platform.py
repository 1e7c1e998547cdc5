"""A ``cpu`` platform for verl 0.9 (``VERL_PLATFORM=cpu``), registered with verl's own
``PlatformRegistry`` (verl/plugin/platform/platform_manager.py:28-79).

verl 0.9.1 registers only nvidia / huawei / amd; with no accelerator it falls back to
"nvidia" (platform_manager.py:114-117), and every ``get_torch_device()`` then means
``torch.cuda``. This platform answers device "cpu", module :mod:`.device`, backend gloo,
and counts the Ray "GPU" resource (Ray hands out logical GPUs that we declare with
``ray_init.num_gpus``; verl's placement groups ask only for GPU/NPU bundles,
single_controller/ray/base.py:146-149).

Two adjustments are not reachable through a registry. First, verl's
``initialize_global_process_group_ray`` (verl/utils/distributed.py:89) builds
``"cpu:gloo,{device}:{backend}"``, which on CPU is ``"cpu:gloo,cpu:gloo"`` and torch rejects
("Duplicate device type cpu"). :func:`install` wraps that one function so that on this
platform it passes plain ``"gloo"``. The smallest upstream fix would be to build the string
only from distinct device types. Second, the reference model's pinned CPU offload
(:func:`_install_unpinned_cpu_offload`, :func:`unpinned_host_memory`). Third, verl's FSDP1
engine (``strategy=fsdp``, verl's default) always asks for ``sync_module_states=True``, which
torch refuses for CPU modules (:func:`_install_fsdp1_cpu_sync`), and moves its parameters to an
invalid "cpu:cpu" device (:func:`_install_fsdp1_host_moves`). All are applied on ``import verl`` (this module is
loaded through ``VERL_USE_EXTERNAL_MODULES``, before any verl worker module binds the
names), in the driver and in every Ray worker.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Optional

from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry, get_platform

from rpgrl.integrations.verl_cpu import device as cpu_device

#: ``VERL_PLATFORM`` value that selects this platform.
PLATFORM_NAME = "cpu"


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """verl platform for CPU-only hosts: device "cpu", gloo, no IPC, no profiler."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        return cpu_device

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Never auto-detected: a CPU run is asked for explicitly with VERL_PLATFORM=cpu.
        return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME

    def current_device(self) -> str:  # type: ignore[override]
        # verl passes it straight to ``.to(...)`` (e.g. fsdp_utils.py:507); an int would mean cuda:N.
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        pass

    def synchronize(self, device_index: Optional[int] = None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        cpu_device.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        cpu_device.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray sets it for the logical GPUs; harmless for a CPU build of torch.
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def _is_cpu_platform() -> bool:
    return get_platform().device_name == "cpu"


def _install_unpinned_cpu_offload() -> None:
    """verl's FSDP2 engine always builds a forward-only (reference) model with
    ``CPUOffloadPolicy(pin_memory=True)`` (verl/workers/engine/fsdp/transformer_impl.py:458-462),
    and pinning host memory needs an accelerator ("Cannot access accelerator device when none
    is available"). On this platform the policy is built unpinned (there is nothing to pin for)."""
    import dataclasses

    import verl.utils.fsdp_utils as fsdp_utils

    base = fsdp_utils.CPUOffloadPolicy
    if base is None or getattr(base, "_rpgrl_cpu", False):
        return

    @dataclasses.dataclass
    class CPUOffloadPolicy(base):  # type: ignore[misc, valid-type]
        _rpgrl_cpu = True

        def __post_init__(self) -> None:
            if _is_cpu_platform():
                self.pin_memory = False

    _rebind(fsdp_utils, "CPUOffloadPolicy", CPUOffloadPolicy, ("verl.workers.engine.fsdp.transformer_impl",))


def unpinned_host_memory() -> None:
    """With no accelerator, make ``Tensor.pin_memory`` return the tensor itself (idempotent).

    FSDP1's ``CPUOffload``, which verl forces on its forward-only reference under
    ``strategy=fsdp`` (verl/workers/engine/fsdp/transformer_impl.py:433), pins the offloaded
    shards, and pinning needs an accelerator ("Cannot access accelerator device when none is
    available"). Without one, page-locked memory has no use: the shards stay in ordinary memory."""
    import torch

    if torch.accelerator.is_available() or getattr(torch.Tensor.pin_memory, "_rpgrl_cpu", False):
        return

    def pin_memory(self, *args: Any, **kwargs: Any) -> "torch.Tensor":
        return self

    pin_memory._rpgrl_cpu = True  # type: ignore[attr-defined]
    torch.Tensor.pin_memory = pin_memory  # type: ignore[method-assign]


def _install_fsdp1_cpu_sync() -> None:
    """verl builds FSDP1 with ``sync_module_states=True`` (transformer_impl.py:444): ranks other
    than 0 initialise on the meta device and receive rank 0's weights by broadcast. torch refuses
    that for CPU modules with a check only ("requires them to be on GPU"); the broadcast itself
    is a gloo collective that works on CPU. On this platform the check is skipped."""
    import torch.distributed.fsdp._init_utils as init_utils

    original = init_utils._check_module_states_for_sync_module_states
    if getattr(original, "_rpgrl_cpu", False):
        return

    @functools.wraps(original)
    def check(module_states: Any) -> None:
        if not _is_cpu_platform():
            original(module_states)

    check._rpgrl_cpu = True  # type: ignore[attr-defined]
    init_utils._check_module_states_for_sync_module_states = check


def _rebind(module: ModuleType, name: str, value: Any, importers: tuple[str, ...]) -> None:
    """Set ``module.name`` and the same name in the modules of ``importers`` that already imported
    it with ``from module import name`` (those bound it at import)."""
    import sys

    setattr(module, name, value)
    for importer in importers:
        if importer in sys.modules:
            setattr(sys.modules[importer], name, value)


def _install_fsdp1_host_moves() -> None:
    """Two of verl's FSDP1 helpers move parameters between the accelerator and the host, which on
    this platform are the same memory:

    * ``load_fsdp_model_to_gpu`` moves the flat parameters to ``f"{device_name}:{device_id}"``
      (verl/utils/fsdp_utils.py:229), here "cpu:cpu", an invalid device. The parameters already
      live on the CPU, so for FSDP1 it only runs FSDP's lazy initialisation (what it does first).
    * ``get_fsdp_full_state_dict(offload_to_cpu=True)`` (the ``hf_model`` checkpoint,
      verl/utils/checkpoint/fsdp_checkpoint_manager.py:425) makes FSDP1 "move" the unsharded
      parameters to the CPU and free the originals, which on a CPU are the same storage (torch's
      ``FlatParamHandle.to_cpu``: "setStorage ... out of bounds for storage of size 0" with 2
      ranks). Here it asks for no offload, which on a CPU is the same result.

    FSDP2 is unchanged."""
    import verl.utils.fsdp_utils as fsdp_utils

    load, full_state = fsdp_utils.load_fsdp_model_to_gpu, fsdp_utils.get_fsdp_full_state_dict
    if getattr(load, "_rpgrl_cpu", False):
        return

    def fsdp1_here(model: Any) -> bool:
        return _is_cpu_platform() and fsdp_utils.fsdp_version(model) == 1

    @functools.wraps(load)
    def load_fsdp_model_to_gpu(model: Any) -> None:
        if not fsdp1_here(model):
            return load(model)
        from torch.distributed.fsdp._runtime_utils import _lazy_init

        _lazy_init(model, model)

    @functools.wraps(full_state)
    def get_fsdp_full_state_dict(model: Any, offload_to_cpu: bool = True, rank0_only: bool = True) -> dict:
        return full_state(model, offload_to_cpu=offload_to_cpu and not fsdp1_here(model), rank0_only=rank0_only)

    load_fsdp_model_to_gpu._rpgrl_cpu = True  # type: ignore[attr-defined]
    _rebind(fsdp_utils, "load_fsdp_model_to_gpu", load_fsdp_model_to_gpu,
            ("verl.workers.engine.fsdp.transformer_impl",))
    _rebind(fsdp_utils, "get_fsdp_full_state_dict", get_fsdp_full_state_dict,
            ("verl.utils.checkpoint.fsdp_checkpoint_manager",))


def install() -> None:
    """Make verl's Ray process-group initialisation use plain gloo on this platform
    (module docstring: verl/utils/distributed.py:89 yields ``cpu:gloo,cpu:gloo``), verl's
    FSDP1 / FSDP2 reference model use an unpinned CPU offload (:func:`_install_unpinned_cpu_offload`,
    :func:`unpinned_host_memory`), and verl's FSDP1 engine build on CPU
    (:func:`_install_fsdp1_cpu_sync`). Idempotent."""
    _install_unpinned_cpu_offload()
    _install_fsdp1_cpu_sync()
    _install_fsdp1_host_moves()
    if _is_cpu_platform():
        unpinned_host_memory()
    import verl.utils.distributed as dist

    original = dist.initialize_global_process_group_ray
    if getattr(original, "_rpgrl_cpu", False):
        return

    @functools.wraps(original)
    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        if _is_cpu_platform() and (backend is None or backend == "cpu:gloo,cpu:gloo"):
            backend = "gloo"
        return original(timeout_second=timeout_second, backend=backend)

    initialize_global_process_group_ray._rpgrl_cpu = True  # type: ignore[attr-defined]
    dist.initialize_global_process_group_ray = initialize_global_process_group_ray
