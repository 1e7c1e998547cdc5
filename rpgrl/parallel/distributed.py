"""Data-parallel training under ``torchrun`` (one node or several): the few collectives
the online loop of docs/math.md §7 needs, and nothing when there is one process.

Layout: every rank holds a full replica of the policy (and anchor); each rank generates,
scores and back-propagates its own contiguous block of ``prompts_per_step / world``
prompts. Groups are never split across ranks, so group-based advantages (grpo, rpg, rloo)
are exact per rank; batch-level ones (batch_mean and the REINFORCE++ whitening of spec
Sec. 5) are computed on the gathered global batch (``rpgrl.algorithm.advantages.global_advantages``). The loss of each mini-batch is divided
by the *global* aggregation count (docs/math.md §6) and gradients are summed across ranks
before clipping, so one distributed optimizer step equals the single-process step on the
union of the shards (what DDP computes, done by hand because the trainer calls the
decoder through ``sequence_logprobs`` rather than ``model.forward``).

Dynamic sampling keeps a different number of groups per rank: the ranks agree on when to
stop generating (a summed count) and exchange the kept groups (:func:`gather_rounds`) so
that each trains on an equal block of them.

A ``DistContext`` with ``world_size == 1`` turns every method into a no-op / identity, so
the trainer has one code path and single-process runs are unchanged bit for bit. This
module holds the collectives only: the batch-size check for a world size lives with the
rest of the config validation (``rpgrl.config.check_world_size``), and how each metric
combines over ranks is declared in ``rpgrl.loop.metrics``.
"""

from __future__ import annotations

import atexit
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterable, Iterator, NoReturn, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DistContext",
    "exit_process",
    "gather_rounds",
    "init_distributed",
    "process_group_active",
    "rank_seed",
    "reduce_metrics",
]

#: Seconds a rank waits at a collective (rank 0 evaluates alone while the others wait).
DEFAULT_TIMEOUT_S = 3600.0
_BUCKET_ELEMS = 1 << 25  # gradient all-reduce bucket (32M elements)


@dataclass(frozen=True)
class DistContext:
    """Who this process is; collectives run on ``device`` (cuda:LOCAL_RANK for NCCL)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ data
    def shard(self, items: Sequence) -> list:
        """This rank's contiguous block of ``items`` (len divisible by world_size)."""
        if len(items) % self.world_size:
            raise ValueError(f"cannot shard {len(items)} items over {self.world_size} processes")
        k = len(items) // self.world_size
        return list(items[self.rank * k:(self.rank + 1) * k])

    # ------------------------------------------------------------------ collectives
    def all_reduce_sum(self, value: float) -> float:
        """Sum of a Python number over ranks (float64, so token counts stay exact)."""
        if not self.enabled:
            return value
        t = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)

    def mean(self, value: float) -> float:
        return self.all_reduce_sum(value) / self.world_size if self.enabled else value

    def all_gather_object(self, obj: Any) -> list:
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. fills the warm-start cache), then the rest."""
        if self.enabled and not self.is_main:
            dist.barrier()
        try:
            yield
        finally:
            if self.enabled and self.is_main:
                dist.barrier()

    @torch.no_grad()
    def broadcast_module(self, module: torch.nn.Module, src: int = 0) -> None:
        """Make every replica bit-identical to rank ``src`` (parameters and buffers)."""
        if not self.enabled:
            return
        for t in [*module.parameters(), *module.buffers()]:
            buf = t.data.to(self.device)
            dist.broadcast(buf, src=src)
            if buf is not t.data:
                t.data.copy_(buf)

    @torch.no_grad()
    def all_reduce_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum ``.grad`` over ranks in place (the DDP all-reduce, without DDP's averaging:
        the loss is already divided by the global count). A parameter whose grad is None on
        some ranks but not others gets zeros there; None on every rank stays None."""
        if not self.enabled:
            return
        params = [p for p in params if p.requires_grad]
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self.device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        grads = []
        for p, h in zip(params, has.tolist()):
            if h and p.grad is None:
                p.grad = torch.zeros_like(p)
            if h:
                grads.append(p.grad)
        bucket: list[Tensor] = []
        size = 0
        for g in grads:
            if bucket and (g.dtype != bucket[0].dtype or g.device != bucket[0].device
                           or size + g.numel() > _BUCKET_ELEMS):
                self._reduce_bucket(bucket)
                bucket, size = [], 0
            bucket.append(g)
            size += g.numel()
        if bucket:
            self._reduce_bucket(bucket)

    def _reduce_bucket(self, bucket: list[Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in bucket]).to(self.device)
        dist.all_reduce(flat)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def reduce_metrics(self, metrics: dict[str, Any], *, sum_prefixes: tuple[str, ...] = (),
                       max_keys: tuple[str, ...] = ()) -> dict[str, Any]:
        """Gather every rank's metrics and combine them with :func:`reduce_metrics` (the
        trainer passes ``rpgrl.loop.metrics.SUM_METRICS`` / ``MAX_METRICS``)."""
        if not self.enabled:
            return metrics
        return reduce_metrics(self.all_gather_object(metrics), sum_prefixes=sum_prefixes,
                              max_keys=max_keys)


def reduce_metrics(per_rank: list[dict[str, Any]], *, sum_prefixes: tuple[str, ...] = (),
                   max_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Combine per-rank metric dicts: sum for keys starting with ``sum_prefixes`` (counts,
    the loss whose per-rank parts share the global denominator), max for ``max_keys``, mean
    otherwise; a mean/max of values equal on every rank keeps the value as is (ints stay ints)."""
    out: dict[str, Any] = {}
    keys = list(dict.fromkeys(k for m in per_rank for k in m))
    for k in keys:
        vals = [m[k] for m in per_rank if k in m]
        if not all(isinstance(v, (int, float)) for v in vals):
            out[k] = vals[0]
        elif sum_prefixes and k.startswith(sum_prefixes):
            out[k] = sum(vals)
        elif all(v == vals[0] for v in vals):
            out[k] = vals[0]
        elif k in max_keys:
            out[k] = max(vals)
        else:
            out[k] = float(sum(vals)) / len(vals)
    return out


# --------------------------------------------------------------------------- setup
def process_group_active() -> bool:
    """Whether this process is in a torch.distributed job (a torchrun worker after init)."""
    return dist.is_available() and dist.is_initialized()


def _destroy() -> None:
    if process_group_active():
        dist.destroy_process_group()


def exit_process(code: int = 0) -> NoReturn:
    """End a torchrun worker that finished: atexit handlers (process group destroyed, reward
    workers closed, loggers flushed), stdout/stderr flushed, then ``os._exit(code)``, without
    interpreter finalization.

    Why: gloo's worker threads drop their reference to a collective's tensors a moment after the
    collective has returned. A tensor made in Python then needs the GIL to free its Python
    object; if that moment falls after the interpreter began finalizing, Python ends the thread
    inside a C++ destructor and the runtime aborts ("terminate called without an active
    exception", SIGABRT), so torchrun reports a run that finished as failed. It is rare on an
    idle machine and more likely under load (CI saw it in tests/test_fsdp_consistency.py); with a
    collective still in flight at exit it happened in 14 of 20 runs, and in 0 of 20 through this
    function (tests/test_distributed_exit.py). ``destroy_process_group`` does not stop those
    threads while a model still holds the group (FSDP's mesh), so finalization must be skipped.
    """
    try:
        run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)  # CPython's own exit path
        if run_exitfuncs is not None:
            run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed or broken stream must not keep the process alive
                pass
        os._exit(code)


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> DistContext:
    """Join the torchrun job described by the environment (WORLD_SIZE, RANK, LOCAL_RANK).

    WORLD_SIZE unset or 1: single process, nothing initialised. Otherwise NCCL with
    ``cuda:LOCAL_RANK`` as the current device when ``device`` allows CUDA and it exists,
    else gloo on CPU. ``timeout_s`` (default ``$RPGRL_DIST_TIMEOUT_S`` or 3600) bounds how
    long a rank waits at a collective. Idempotent: an existing process group is reused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not process_group_active():
        return DistContext()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.device={device} but no CUDA device is visible; use trainer.device=cpu")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        n = torch.cuda.device_count()
        if local >= n:
            raise RuntimeError(f"LOCAL_RANK={local} but only {n} CUDA device(s) are visible on this "
                               f"node: use torchrun --nproc_per_node {n} (one process per GPU)")
        torch.cuda.set_device(local)
        comm = torch.device("cuda", local)
    else:
        comm = torch.device("cpu")
    if not dist.is_initialized():
        timeout = timeout_s if timeout_s is not None else float(
            os.environ.get("RPGRL_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout))
        atexit.register(_destroy)
    return DistContext(dist.get_rank(), dist.get_world_size(), local, comm)


def gather_rounds(ctx: DistContext, parts: list) -> list:
    """Every rank's per-round ``parts`` (same number of rounds on every rank), flattened
    round by round and, within a round, in rank order: the prompt order, since each round's
    prompts are split into contiguous rank blocks (dynamic sampling, docs/math.md §7)."""
    if not ctx.enabled:
        return list(parts)
    per_rank = ctx.all_gather_object(list(parts))
    if len({len(p) for p in per_rank}) != 1:
        raise RuntimeError(f"gather_rounds: ranks ran {[len(p) for p in per_rank]} rounds")
    return [p[r] for r in range(len(parts)) for p in per_rank]


def rank_seed(seed: int, rank: int) -> int:
    """Distinct sampling seeds per rank (rank 0 keeps ``seed``)."""
    return seed + 1_000_003 * rank
