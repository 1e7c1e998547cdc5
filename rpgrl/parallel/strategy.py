"""How the policy is laid out over processes (docs/math.md §7, docs/scaling.md), as one strategy
object: wrapping, log-probs, gradient reduction, full state dicts and the weights that
sample/evaluate (Schedule-Free's averaged iterate, FSDP's gathered shards). The trainer
calls these and holds no per-strategy branch.

``SingleProcess``: one process. ``Replicated``: torchrun, a full replica per rank and a
manual gradient all-reduce (``rpgrl.parallel.distributed``). ``Fsdp2``: torchrun with
``trainer.fsdp=true``, FSDP2 shards (``rpgrl.parallel.fsdp``).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from rpgrl.loop.checkpoint import load_checkpoint
from rpgrl.config import Config
from rpgrl.parallel.distributed import DistContext
from rpgrl.models.logprobs import sequence_logprobs
from rpgrl.loop.optim import eval_mode


class SingleProcess:
    name = "none"

    def __init__(self, dist: DistContext) -> None:
        self.dist = dist

    def wrap(self, model: torch.nn.Module) -> None:
        """Prepare the policy for training (after the anchor snapshot, before the optimizer)."""

    def logprobs(self, model: torch.nn.Module) -> Callable:
        """``sequence_logprobs`` bound to ``model``."""
        return lambda *a, **k: sequence_logprobs(model, *a, **k)

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

        shard_policy(model)  # replaces the manual all-reduce; the optimizer sees the shards

    def logprobs(self, model: torch.nn.Module) -> Callable:
        from rpgrl.parallel.fsdp import logprobs_fn

        return logprobs_fn(model)

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


def make_parallel(dist: DistContext, cfg: Config) -> SingleProcess:
    """The strategy for this process group and ``cfg.trainer.fsdp``."""
    if not dist.enabled:
        return SingleProcess(dist)
    return Fsdp2(dist) if cfg.trainer.fsdp else Replicated(dist)
