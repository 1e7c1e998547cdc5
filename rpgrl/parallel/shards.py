"""Each rank's own FSDP shards of a model: read, write and compare them with no collective.

Two FSDP-wrapped models of one architecture, sharded the same way, hold the same slices of every
parameter on every rank, so copying one into the other (verl's iterative reference: the actor
into the reference engine, docs/verl.md) is a local copy of each rank's shards, and saving /
restoring one is a per-rank file of them.

The subtle part is that FSDP can keep an *unsharded* copy of a unit alive after a forward, and
its next forward then uses that copy without all-gathering the shards: FSDP1 never reshards the
root unit after a forward (it expects the backward to follow), and FSDP2 keeps any unit built with
``reshard_after_forward=False``. Writing only the shards would leave such a model computing with
its old weights. So every function here that writes first reshards the model (:func:`reshard`),
and FSDP1 is handled at the level of its flat parameters, whose ``_local_shard`` is the one
full-precision sharded copy (``use_orig_params`` true or false alike).

Supported: FSDP1 (``FullyShardedDataParallel``, any sharding strategy, with or without
``CPUOffload``), FSDP2 (``fully_shard``, with or without ``CPUOffloadPolicy``), and plain modules.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

#: FSDP1 prefixes its wrapped modules' names with this (stripped from the names used here).
_FSDP1_PREFIX = "_fsdp_wrapped_module."


def _fsdp1_units(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """(name, FSDP1 instance) for every FSDP1 unit that owns a flat parameter."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for name, m in model.named_modules():
        if isinstance(m, FSDP) and getattr(m, "_handle", None) is not None:
            yield name.replace(_FSDP1_PREFIX, ""), m


def fsdp_version(model: torch.nn.Module) -> int:
    """1 (FullyShardedDataParallel), 2 (fully_shard) or 0 (not FSDP-wrapped)."""
    from torch.distributed.fsdp import FSDPModule

    if next(_fsdp1_units(model), None) is not None:
        return 1
    return 2 if any(isinstance(m, FSDPModule) for m in model.modules()) else 0


def reshard(model: torch.nn.Module) -> None:
    """Free every unsharded copy FSDP still holds, so the next forward all-gathers the shards."""
    version = fsdp_version(model)
    if version == 1:
        from torch.distributed.fsdp._runtime_utils import _lazy_init, _reshard

        units = list(_fsdp1_units(model))
        # FSDP1 sets up the flat parameters' sharded / unsharded buffers at its first forward;
        # before that, do it here (as FSDP's own state_dict and summon_full_params do)
        _lazy_init(units[0][1], units[0][1])
        for _, unit in units:
            handle = unit._handle
            # needs_unshard() is False exactly when the padded unsharded flat parameter is allocated
            if handle.uses_sharded_strategy and not handle.needs_unshard():
                _reshard(unit, handle, True)
    elif version == 2:
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def local_shards(model: torch.nn.Module) -> dict[str, Tensor]:
    """name -> this rank's shard of it, a tensor that aliases the model's storage (writing it
    writes the model). FSDP1: one entry per flat parameter (``<unit>._flat_param``, its
    full-precision ``_local_shard``, padding included); FSDP2: each parameter's ``to_local()``;
    plain modules: each parameter. The model is resharded first (:func:`reshard`): an FSDP2 unit
    that is still unsharded exposes full tensors, and a write must reach the next forward."""
    from torch.distributed.tensor import DTensor

    reshard(model)
    shards: dict[str, Tensor] = {}
    flat_ids = set()
    for name, unit in _fsdp1_units(model):
        flat = unit._handle.flat_param
        # the flat parameter and, with use_orig_params=True, the views into it
        flat_ids.update(id(t) for t in [flat, *(flat._params or ()), *(flat._shared_params or ())])
        shards[f"{name}._flat_param" if name else "_flat_param"] = flat._local_shard
    for name, p in model.named_parameters():
        if id(p) in flat_ids:
            continue
        shards[name.replace(_FSDP1_PREFIX, "")] = (p.to_local() if isinstance(p, DTensor) else p).data
    return shards


def _layout(shards: dict[str, Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {n: (tuple(t.shape), t.dtype) for n, t in shards.items()}


def shard_layout(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of this rank's shards: two models with equal layouts can be
    copied into each other shard by shard."""
    return _layout(local_shards(model))


def layout_mismatch(src: dict, dst: dict) -> str | None:
    """A one-line description of how two :func:`shard_layout` results differ, or None."""
    only_src, only_dst = sorted(set(src) - set(dst)), sorted(set(dst) - set(src))
    if only_src or only_dst:
        return f"different parameters: only in the first {only_src[:4]}, only in the second {only_dst[:4]}"
    for name in src:
        if src[name] != dst[name]:
            (s_shape, s_dtype), (d_shape, d_dtype) = src[name], dst[name]
            return (f"{name}: shard {s_shape} {str(s_dtype).replace('torch.', '')} vs "
                    f"{d_shape} {str(d_dtype).replace('torch.', '')}")
    return None


@torch.no_grad()
def copy_shards(src: torch.nn.Module, dst: torch.nn.Module) -> int:
    """Copy ``src``'s weights into ``dst`` exactly, each rank its own shards (no collective);
    both are resharded first (module docstring). Returns the number of tensors copied."""
    s, d = local_shards(src), local_shards(dst)
    problem = layout_mismatch(_layout(s), _layout(d))
    if problem is not None:
        raise ValueError(f"cannot copy shard by shard, the two models are sharded differently: {problem}")
    for name, target in d.items():
        target.copy_(s[name])
    return len(d)


@torch.no_grad()
def load_shards(model: torch.nn.Module, shards: dict[str, Tensor], *, source: str) -> None:
    """Write shards saved from :func:`local_shards` (same layout) back into ``model``; ``source``
    names where they came from in the error."""
    own = local_shards(model)
    problem = layout_mismatch(_layout(shards), _layout(own))
    if problem is not None:
        raise ValueError(f"{source}: the saved shards do not fit this model's sharding ({problem}); "
                         f"resume with the world size and FSDP settings the checkpoint was written with")
    for name, target in own.items():
        target.copy_(shards[name])
