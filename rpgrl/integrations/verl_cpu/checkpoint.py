"""``rollout.checkpoint_engine.backend=rpgrl_ray``: trainer -> rollout weight sync through Ray's
object store, for verl 0.9's disaggregated pipelines on CPU.

verl syncs weights to a rollout that is *not* in the trainer's process (v1 ``separate_async``,
``verl.experimental.one_step_off_policy``, ``fully_async_policy``) with a checkpoint engine:
nccl / hccl / nixl / mooncake / kimi (verl/checkpoint_engine/*.py), all of which need
accelerators; ``naive`` is the in-process hybrid path and those pipelines refuse it
(e.g. verl/trainer/ppo/v1/trainer_separate_async.py:67-69). This engine, registered with
verl's own ``CheckpointEngineRegistry`` (verl/checkpoint_engine/base.py:76-113), sends the
full tensors through Ray: every actor rank drains verl's weight generator (it may gather
FSDP shards), rank 0 posts the state dict to a named :class:`WeightBoard` actor under a token
that the driver's ``build_topology`` gives both sides; each rollout worker waits for that
token and yields the tensors to its server adapter. The board holds the tensors themselves,
not an object reference: a reference put by a sender that has moved on can be freed by Ray
before the rollout asks for it (a receive then waited forever). Slow (two full copies per
sync) and meant for tiny models and tests. ``receive_weights`` is a plain generator, which is
what the ``rpgrl_hf`` server adapter iterates (verl declares it ``async``; its vLLM / SGLang
adapters are not meant to pair with this engine).

A receive waits at most ``fetch_timeout_s`` (default :data:`FETCH_TIMEOUT_S`; verl passes
``rollout.checkpoint_engine.engine_kwargs.rpgrl_ray`` to the constructor), then fails with an
error that says so: a rollout whose trainer died must not wait forever.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Generator, Optional

import ray
import torch

from verl.checkpoint_engine.base import CheckpointEngine, CheckpointEngineRegistry

#: ``actor_rollout_ref.rollout.checkpoint_engine.backend`` of this engine.
BACKEND = "rpgrl_ray"
BOARD_NAME = "rpgrl_ray_weight_board"
#: How long a rollout waits for the trainer's weights (a healthy sync of the tiny models this
#: engine is for takes seconds; even a slow training step posts well within an hour).
FETCH_TIMEOUT_S = 3600.0


class WeightBoard:
    """Named Ray actor: token -> the weights sent under it (the latest ``keep`` kept)."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self.weights: dict[str, dict[str, torch.Tensor]] = {}
        self.events: dict[str, asyncio.Event] = {}

    def _event(self, token: str) -> asyncio.Event:
        return self.events.setdefault(token, asyncio.Event())

    async def post(self, token: str, state: dict[str, torch.Tensor]) -> None:
        self.weights[token] = state
        self._event(token).set()
        for old in list(self.weights)[: -self.keep]:
            self.weights.pop(old, None)
            self.events.pop(old, None)

    async def fetch(self, token: str, timeout_s: Optional[float] = None) -> Optional[dict[str, torch.Tensor]]:
        """The weights posted under ``token``, or None if none came within ``timeout_s``."""
        try:
            await asyncio.wait_for(self._event(token).wait(), timeout_s)
        except asyncio.TimeoutError:
            return None
        return self.weights[token]


_BOARD = None


def _board():
    """This process's handle on the board, kept for the process's lifetime: Ray kills a
    (non-detached) named actor once no handle to it is left, so a handle dropped after a send
    would take the weights with it, and the receiver's ``get_if_exists`` would start an empty
    board and wait forever."""
    global _BOARD
    if _BOARD is None:
        _BOARD = ray.remote(WeightBoard).options(name=BOARD_NAME, get_if_exists=True, num_cpus=0).remote()
    return _BOARD


@CheckpointEngineRegistry.register(BACKEND)
class RayCheckpointEngine(CheckpointEngine):
    """verl ``CheckpointEngine`` over Ray's object store (module docstring)."""

    def __init__(self, bucket_size: int = 0, is_master: bool = False, fetch_timeout_s: float = FETCH_TIMEOUT_S,
                 **_: Any) -> None:
        if not fetch_timeout_s > 0:
            raise ValueError(f"rollout.checkpoint_engine.engine_kwargs.{BACKEND}.fetch_timeout_s must be > 0 "
                             f"(seconds), got {fetch_timeout_s!r}")
        self.bucket_size = bucket_size
        self.is_master = is_master
        self.fetch_timeout_s = float(fetch_timeout_s)
        self.rank: Optional[int] = None
        self.token: Optional[str] = None

    def prepare(self) -> dict:
        return {}

    @classmethod
    def build_topology(cls, actor_wg_world_size: int, rollout_world_size: int, metadata: list[dict]):
        token = uuid.uuid4().hex  # one per sync, shared by both sides
        actor = {"rank": list(range(actor_wg_world_size)), "token": [token] * actor_wg_world_size}
        rollout = {"rank": [-1] * rollout_world_size, "token": [token] * rollout_world_size}
        return actor, rollout

    def init_process_group(self, rank: int, token: str, **_: Any) -> None:
        self.rank, self.token = rank, token

    def finalize(self) -> None:
        self.token = None

    async def send_weights(self, weights: Generator[tuple[str, torch.Tensor], None, None],
                           global_steps: Optional[int] = None) -> dict:
        state = {name: t.detach().to("cpu", copy=True) for name, t in weights}  # every rank drains
        if self.rank == 0:
            if self.token is None:
                raise RuntimeError("rpgrl_ray checkpoint engine: send_weights before init_process_group")
            await _board().post.remote(self.token, state)
        return {}

    def receive_weights(self, global_steps: Optional[int] = None) -> Generator[tuple[str, torch.Tensor], None, None]:
        if self.token is None:
            raise RuntimeError("rpgrl_ray checkpoint engine: receive_weights before init_process_group")
        state = ray.get(_board().fetch.remote(self.token, self.fetch_timeout_s))
        if state is None:
            raise TimeoutError(
                f"{BACKEND} checkpoint engine: no weights arrived within {self.fetch_timeout_s:g} s (token "
                f"{self.token}): the trainer that sends them has not; if it died, its log says why; if a sync "
                f"really takes longer, raise rollout.checkpoint_engine.engine_kwargs.{BACKEND}.fetch_timeout_s")
        yield from state.items()
