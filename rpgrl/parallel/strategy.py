"""How the policy is laid out over processes (docs/math.md §7, docs/scaling.md), as one strategy
object: wrapping, log-probs, gradient reduction, full state dicts and the weights that
sample/evaluate (Schedule-Free's averaged iterate, FSDP's gathered shards). The trainer
calls these and holds no per-strategy branch.

``SingleProcess``: one process. ``Replicated``: torchrun, a full replica per rank and a
manual gradient all-reduce (``rpgrl.parallel.distributed``). ``Fsdp2``: torchrun with
``trainer.fsdp=true``, FSDP2 shards (``rpgrl.parallel.fsdp``).

Precision (``rpgrl.models.loading.Precision``, docs/precision.md): every forward of the
policy -- sampling, pi_old, the update, the anchor -- runs in :meth:`SingleProcess.compute`,
so under bf16 mixed precision they all see the same bf16 numerics; FSDP2 gets them from its
``MixedPrecisionPolicy`` instead of autocast.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from rpgrl.loop.checkpoint import load_checkpoint
from rpgrl.config import Config
from rpgrl.parallel.distributed import DistContext
from rpgrl.models.loading import Precision
from rpgrl.models.logprobs import sequence_logprobs
from rpgrl.loop.optim import eval_mode

_FP32 = Precision(torch.float32, torch.float32, "fp32")


class SingleProcess:
    name = "none"

    def __init__(self, dist: DistContext, precision: Precision = _FP32, device: torch.device | str = "cpu") -> None:
        self.dist, self.precision, self.device = dist, precision, torch.device(device)

    def wrap(self, model: torch.nn.Module) -> None:
        """Prepare the policy for training (after the anchor snapshot, before the optimizer)."""

    def compute(self):
        """The context the policy's forwards run in (sampling included): bf16 autocast under
        mixed precision, else nothing."""
        return self.precision.autocast(self.device)

    def logprobs(self, model: torch.nn.Module) -> Callable:
        """``sequence_logprobs`` bound to ``model``, in :meth:`compute`."""
        return _in(self.compute, lambda *a, **k: sequence_logprobs(model, *a, **k))

    def reduce_grads(self, model: torch.nn.Module) -> None:
        """Make ``.grad`` the global gradient before clipping."""

    @contextmanager
    def inference_weights(self, model: torch.nn.Module, optimizer) -> Iterator[None]:
        """The weights one samples and evaluates with (collective for FSDP)."""
        with eval_mode(optimizer):
            yield

    def full_weights(self, model: torch.nn.Module):
        """Something with the policy's full ``state_dict()`` (the anchor refresh)."""
        return model

    def checkpoint_views(self, model: torch.nn.Module, optimizer) -> tuple:
        """What ``rpgrl.loop.checkpoint.save_checkpoint`` writes (collective for FSDP)."""
        return model, optimizer

    def load(self, path: Path, model: torch.nn.Module, optimizer) -> dict:
        """Load a checkpoint into the policy and optimizer; returns the trainer state."""
        return load_checkpoint(path, model, optimizer)

    def final_state_dict(self, model: torch.nn.Module, optimizer) -> dict | None:
        """The evaluated weights gathered for ``final/`` (None: the module holds them)."""
        return None


class Replicated(SingleProcess):
    name = "replicated"

    def reduce_grads(self, model: torch.nn.Module) -> None:
        self.dist.all_reduce_grads(model.parameters())


class Fsdp2(Replicated):
    name = "fsdp2"

    def wrap(self, model: torch.nn.Module) -> None:
        from rpgrl.parallel.fsdp import shard_policy

        # replaces the manual all-reduce; the optimizer sees the (fp32) shards
        shard_policy(model, compute_dtype=self.precision.compute_dtype)

    def compute(self):
        """Nothing for the sharded policy: its ``MixedPrecisionPolicy`` casts (no autocast on
        top, so the numerics are FSDP2's own, e.g. torchtitan's)."""
        return contextlib.nullcontext()

    def logprobs(self, model: torch.nn.Module) -> Callable:
        """The sharded policy through FSDP's hooks; an unsharded replica (the anchor) in
        autocast, the nearest single-process equivalent of the policy's bf16 compute."""
        from rpgrl.parallel.fsdp import is_sharded, logprobs_fn

        if is_sharded(model):
            return logprobs_fn(model)
        return _in(lambda: self.precision.autocast(self.device), logprobs_fn(model))

    def reduce_grads(self, model: torch.nn.Module) -> None:
        pass  # FSDP2 has reduce-scattered (summed) them in backward

    @contextmanager
    def inference_weights(self, model: torch.nn.Module, optimizer) -> Iterator[None]:
        from rpgrl.parallel.fsdp import fsdp_unsharded

        with eval_mode(optimizer), fsdp_unsharded(model):
            yield

    def full_weights(self, model: torch.nn.Module):
        from rpgrl.parallel.fsdp import FullWeights

        return FullWeights(model)

    def checkpoint_views(self, model: torch.nn.Module, optimizer) -> tuple:
        from rpgrl.parallel.fsdp import FsdpCheckpointView, fsdp_full_state

        sd, osd = fsdp_full_state(model, optimizer)  # gathered on rank 0, unsharded format
        return FsdpCheckpointView(sd), FsdpCheckpointView(osd)

    def load(self, path: Path, model: torch.nn.Module, optimizer) -> dict:
        from rpgrl.parallel.fsdp import FsdpCheckpointView, fsdp_load_full_state, shape_free_keys

        full_model, full_opt = FsdpCheckpointView(expected=shape_free_keys(model)), FsdpCheckpointView()
        state = load_checkpoint(path, full_model, full_opt)  # every rank reads, keeps its shards
        fsdp_load_full_state(model, optimizer, full_model.loaded, full_opt.loaded)
        return state

    def final_state_dict(self, model: torch.nn.Module, optimizer) -> dict | None:
        from rpgrl.parallel.fsdp import fsdp_full_state

        with eval_mode(optimizer):
            return fsdp_full_state(model)[0]


def _in(context: Callable, fn: Callable) -> Callable:
    """``fn`` called inside a fresh ``context()``."""
    def call(*a, **k):
        with context():
            return fn(*a, **k)
    return call


def make_parallel(dist: DistContext, cfg: Config, precision: Precision = _FP32,
                  device: torch.device | str = "cpu") -> SingleProcess:
    """The strategy for this process group and ``cfg.trainer.fsdp``, computing in ``precision``."""
    if not dist.enabled:
        return SingleProcess(dist, precision, device)
    return (Fsdp2 if cfg.trainer.fsdp else Replicated)(dist, precision, device)
