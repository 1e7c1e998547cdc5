"""FSDP2 sharding of the policy for ``trainer.fsdp=true`` under torchrun.

``rpgrl.parallel.distributed`` replicates the model and all-reduces gradients; this module shards it
instead with ``torch.distributed.fsdp.fully_shard`` (per decoder layer + root), and provides
what the trainer needs around that: log-probs through FSDP's hooks (``sequence_logprobs``
never calls the root ``forward``), gathered weights for generation, and full state dicts in
the same checkpoint format as a replicated run.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from rpgrl.config import ConfigError
from rpgrl.models.logprobs import sequence_logprobs

_LOGPROBS_METHOD = "rpgrl_sequence_logprobs"


def shard_policy(model: torch.nn.Module, compute_dtype: torch.dtype = torch.float32) -> None:
    """``fully_shard`` each decoder layer, then the root (embeddings, final norm and the
    tied lm_head stay in the root group). Gradients are *summed* over ranks, as in
    :meth:`rpgrl.parallel.distributed.DistContext.all_reduce_grads` (the loss already has the global denominator of
    docs/math.md §6); ``force_sum`` keeps the reduce-scatter a plain SUM, which gloo supports.

    ``sequence_logprobs`` calls the decoder and the LM-head weight directly, never the
    root ``forward``, so it is registered as an FSDP forward method on the root: the root
    group is all-gathered before it and its gradients are reduce-scattered after backward.

    ``compute_dtype`` bf16 (mixed precision, docs/precision.md): the decoder layers get
    ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` -- fp32 sharded parameters
    and optimizer state, bf16 all-gathered weights and layer compute, gradients
    reduce-scattered in fp32. The root keeps fp32 compute, so the LM head's logits and the
    log-softmax after them are fp32 (its all-gather is then fp32: the price of exact logits).
    """
    from torch.distributed.fsdp import (FSDPModule, MixedPrecisionPolicy, fully_shard,
                                        register_fsdp_forward_method)

    if hasattr(model, "get_base_model"):
        raise ConfigError("trainer.fsdp: PEFT/LoRA models are not supported with FSDP; "
                          "set trainer.fsdp=false (LoRA state is small enough to replicate)")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ConfigError(f"trainer.fsdp: {type(model).__name__} has no decoder .layers to shard; "
                          "set trainer.fsdp=false")
    mp = MixedPrecisionPolicy()  # fp32: no casts, as without a policy
    if compute_dtype != torch.float32:
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model)  # the root: fp32 (embeddings, final norm, LM head)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    object.__setattr__(model, _LOGPROBS_METHOD, lambda *a, **k: sequence_logprobs(model, *a, **k))
    register_fsdp_forward_method(model, _LOGPROBS_METHOD)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether :func:`shard_policy` sharded ``model`` (the anchor replica is not)."""
    return _LOGPROBS_METHOD in model.__dict__


def logprobs_fn(model: torch.nn.Module):
    """``sequence_logprobs`` bound to ``model``, through FSDP's hooks when it is sharded."""
    fn = model.__dict__.get(_LOGPROBS_METHOD)
    return fn if fn is not None else (lambda *a, **k: sequence_logprobs(model, *a, **k))


@contextmanager
def fsdp_unsharded(model: torch.nn.Module) -> Iterator[None]:
    """All ranks all-gather every FSDP group once and keep it gathered inside the block.

    For ``generate`` and evaluation: ranks decode different numbers of tokens (and rank 0
    evaluates alone), so per-step all-gathers would mismatch across ranks and hang. Inside
    the block forwards run on the full weights with no collective; memory is the full
    model, as without FSDP. Collective on entry and exit; a no-op for an unsharded model.
    """
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not mods:
        yield
        return
    for m in mods:
        m.unshard()
    inner = [m for m in mods if m is not model]
    for m in inner:
        m.set_reshard_after_forward(False, recurse=False)
    # HF generate turns on synced_gpus (an all-reduce per token) for FSDP-managed models;
    # with the weights gathered every rank decodes alone, so it must stay off
    managed = model.__dict__.get("_is_fsdp_managed_module")
    model._is_fsdp_managed_module = False
    try:
        yield
    finally:
        if managed is None:
            del model._is_fsdp_managed_module
        else:
            model._is_fsdp_managed_module = managed
        for m in inner:
            m.set_reshard_after_forward(True, recurse=False)
        for m in mods:
            m.reshard()


def _tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """``{alias: name}`` for parameters reachable under several names (tied embeddings)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """FQN of each optimizer parameter, in ``optimizer.state_dict()``'s index order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def fsdp_full_state(model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimizer state dicts on rank 0, ``({}, {})``
    elsewhere. Collective. Same layout as the unsharded trainer's checkpoint: tied names
    share one tensor and optimizer state is keyed by parameter index, so checkpoints are
    interchangeable between ``trainer.fsdp`` true and false."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else {}
    if not sd:
        return {}, {}
    # gathered tensors may be views of one flat buffer; safetensors wants one storage each
    sd = {k: v if v.untyped_storage().nbytes() == v.nbytes else v.clone() for k, v in sd.items()}
    for alias, name in _tied_aliases(model).items():
        if alias in sd:
            sd[alias] = sd[name]
    if optimizer is None:
        return sd, {}
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    osd = {"state": {index[k]: v for k, v in osd["state"].items()},
           "param_groups": [{**g, "params": [index[k] for k in g["params"]]} for g in osd["param_groups"]]}
    return sd, osd


def fsdp_load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                         sd: dict, osd: dict | None) -> None:
    """Inverse of :func:`fsdp_full_state`; every rank passes the full dicts and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True)
    sd = dict(sd)
    for alias, name in _tied_aliases(model).items():  # the file keeps one of the tied names
        if alias in sd or name in sd:
            sd[alias] = sd[name] = sd.get(name, sd.get(alias))
    set_model_state_dict(model, sd, options=opts)
    if optimizer is not None and osd is not None:
        names = _param_names(model, optimizer)
        osd = {"state": {names[k]: v for k, v in osd["state"].items()},
               "param_groups": [{**g, "params": [names[k] for k in g["params"]]} for g in osd["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, osd, options=opts)


class FsdpCheckpointView:
    """Stands in for the model and the optimizer in ``rpgrl.loop.checkpoint`` (which calls
    ``state_dict()`` / ``load_state_dict()``): serves the gathered full state dict on save,
    captures what the file holds on load, so the on-disk format is the unsharded one."""

    def __init__(self, state: dict | None = None, expected: dict | None = None) -> None:
        self.state = state or {}
        self.expected = expected  # full-shape model state (name -> tensor) on load
        self.loaded: dict | None = None

    def state_dict(self) -> dict:
        return self.expected if self.expected is not None else self.state

    def load_state_dict(self, state: dict, strict: bool = True):
        self.loaded = dict(state)
        if self.expected is None:
            return None
        missing = [k for k in self.expected if k not in state]
        unexpected = [k for k in state if k not in self.expected]
        return missing, unexpected


class FullWeights:
    """An FSDP policy seen as full weights by ``Anchor.maybe_refresh`` (gathers on every
    rank when called; all ranks refresh together since the anchor KL is averaged)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))


def shape_free_keys(model: torch.nn.Module) -> dict:
    """The model's state-dict names, tied names sharing one placeholder tensor: what
    safetensors' ``load_model`` needs to match a file's keys (shapes are checked later)."""
    ids: dict[int, torch.Tensor] = {}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        out[name] = ids.setdefault(id(t), torch.zeros(1))
    return out
