"""The anchor's schedule and its checkpoint across ranks, through verl's real worker methods.

Under real ``torchrun`` (gloo, 2 CPU processes), ``RPGActorRolloutRefWorker``'s own
``update_actor`` / ``compute_ref_log_prob`` / ``save_checkpoint`` / ``load_checkpoint`` run on top
of verl's ``ActorRolloutRefWorker`` methods, with the inner training worker (verl's
``TrainingWorker``) replaced by a stand-in that does what verl's does under Ulysses sequence
parallelism of 2: ``train_mini_batch`` returns the metrics on sequence-parallel rank 0 and
``None`` on rank 1 (verl/workers/engine_workers.py:313-327). Actor and reference are tiny
Llamas sharded with FSDP2 over both ranks.

* Every rank refreshes at the same batch: periodic (K = 3 optimizer steps, 2 per batch: due
  after batch 2, refreshed at the start of batch 3) and adaptive (kappa = 0.05 on a moving
  average of the KLs that only rank 0 sees). With the KLs rank 0 reports, both ranks' schedules
  are identical (steps, refresh count, the moving average), and each rank's reference shards
  equal the actor's as they were at the refresh.
* ``save_checkpoint`` then ``load_checkpoint`` into a fresh worker restores the schedule and every
  rank's reference shards bit for bit; a checkpoint without anchor state (a plain verl run)
  warns and says what the reference will be.

Run as a script (``torchrun ... tests/test_verl_anchor_ranks.py OUT``) it is the worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The per-optimizer-step KL to the anchor that rank 0 reports, 2 optimizer steps per batch.
KLS = {"periodic": [[0.01, 0.02], [0.5, 0.5], [0.01, 0.01], [0.01, 0.6]],
       "adaptive": [[0.01, 0.02], [0.5, 0.5], [0.01, 0.01], [0.01, 0.6]]}


def _worker(out: str) -> None:
    import warnings

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM
    from verl.utils import tensordict_utils as tu

    from rpgrl.algorithm.anchor import Anchor
    from rpgrl.integrations import verl_anchor as va

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)

    def model(seed: int):
        torch.manual_seed(seed)
        m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
        for layer in m.model.layers:
            fully_shard(layer)
        fully_shard(m)
        return m

    class Engine:
        def __init__(self, module):
            self.module = module

        def get_data_parallel_group(self):
            return dist.group.WORLD

    class InnerWorker:
        """verl's TrainingWorker as the hybrid worker calls it, under Ulysses SP = 2."""

        def __init__(self, module, kls=()):
            self.engine, self.kls = Engine(module), iter(kls)

        def train_mini_batch(self, data):
            kls = next(self.kls)
            if rank != 0:  # Ulysses SP rank 1: verl returns no output here
                return None
            return tu.get_tensordict(tensor_dict={}, non_tensor_dict={"metrics": {va.KL_ANCHOR: list(kls)}})

        def infer_batch(self, data):
            return None

        def save_checkpoint(self, *args, **kwargs):
            pass

        def load_checkpoint(self, *args, **kwargs):
            pass

    def worker(mode: str, actor, ref, kls=()):
        w = object.__new__(va.RPGActorRolloutRefWorker)
        w.role, w.enable_routing_replay = "actor_rollout_ref", False
        w.actor, w.ref = InnerWorker(actor, kls), InnerWorker(ref)
        w._rpg_anchor = Anchor(mode=mode, period=3, kappa=0.05, ema=0.9, model=torch.nn.Module())
        return w

    def shards(m):
        return {n: t.clone() for n, t in va.local_shards(m).items()}

    empty = tu.get_tensordict(tensor_dict={}, non_tensor_dict={})
    result = {}
    for mode, kls in KLS.items():
        actor, ref = model(1), model(2)
        w = worker(mode, actor, ref, kls)
        refreshed, actor_at_refresh = [], None
        for batch in range(1, len(kls) + 1):
            with torch.no_grad():  # the policy moves between batches
                for p in actor.parameters():
                    p.to_local().add_(0.01 * batch)
            before = w._rpg_anchor.refreshes
            w.compute_ref_log_prob(empty)
            if w._rpg_anchor.refreshes > before:
                refreshed.append(batch)
                actor_at_refresh = shards(actor)
            w.update_actor(empty)
        ref_is_actor_at_refresh = actor_at_refresh is not None and all(
            torch.equal(actor_at_refresh[n], t) for n, t in va.local_shards(ref).items())
        state = {k: v for k, v in w._rpg_anchor.state_dict().items() if k != "weights"}

        # save, then restore into a fresh worker whose reference holds other weights
        ckpt = Path(out).parent / f"ckpt_{mode}"
        w.save_checkpoint(str(ckpt))
        fresh = worker(mode, model(3), model(4))
        fresh.load_checkpoint(str(ckpt))
        restored = {k: v for k, v in fresh._rpg_anchor.state_dict().items() if k != "weights"}
        saved_ref = shards(ref)
        ref_restored = all(torch.equal(saved_ref[n], t) for n, t in va.local_shards(fresh.ref.engine.module).items())

        # a checkpoint of a plain verl run: no anchor state -> a warning that says what happens
        plain = worker(mode, model(3), model(4))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plain.load_checkpoint(str(Path(out).parent / "plain_verl_ckpt"))
        result[mode] = dict(refreshed=refreshed, state=state, restored=restored, ref_restored=ref_restored,
                            ref_is_actor_at_refresh=ref_is_actor_at_refresh,
                            warning=[str(c.message) for c in caught],
                            plain_state={k: v for k, v in plain._rpg_anchor.state_dict().items() if k != "weights"})
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.barrier()


@pytest.mark.medium
def test_all_ranks_refresh_together_and_resume_the_anchor(tmp_path):
    pytest.importorskip("verl", reason="verl is not installed")
    out = tmp_path / "ranks.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", VERL_USE_EXTERNAL_PLUGINS="none")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    rank0, rank1 = json.loads(out.read_text())
    for mode in KLS:
        a, b = rank0[mode], rank1[mode]
        # due after batch 2 (periodic: 4 >= K = 3 steps; adaptive: 0.9 * 0.011 + 0.1 * 0.5 > 0.05),
        # refreshed at the start of batch 3, due again after batch 4 -- on both ranks
        assert a["refreshed"] == b["refreshed"] == [3], (mode, a["refreshed"], b["refreshed"])
        assert a["state"] == b["state"], (mode, a["state"], b["state"])
        assert a["state"]["refreshes"] == 1 and a["state"]["steps_since_refresh"] == 4 and a["state"]["due"], a
        assert a["ref_is_actor_at_refresh"] and b["ref_is_actor_at_refresh"]
        # resume: the same schedule and, on every rank, the same reference bytes
        assert a["restored"] == a["state"] and b["restored"] == b["state"]
        assert a["ref_restored"] and b["ref_restored"]
    assert rank0["adaptive"]["state"]["kl_ema"] == pytest.approx(0.9 * 0.01 + 0.1 * 0.6)
    # a checkpoint without anchor state: warned once (rank 0), schedule at zero
    for mode in KLS:
        assert len(rank0[mode]["warning"]) == 1 and rank1[mode]["warning"] == []
        assert "holds no anchor state" in rank0[mode]["warning"][0] and "initial model" in rank0[mode]["warning"][0]
        assert rank0[mode]["plain_state"]["refreshes"] == 0 and rank0[mode]["plain_state"]["steps_since_refresh"] == 0


if __name__ == "__main__":
    from rpgrl.parallel.distributed import exit_process

    _worker(sys.argv[1])
    exit_process(0)  # skip finalization: a gloo thread can abort it (exit_process)
