"""The anchor refresh of rpgrl.integrations.verl_anchor copies FSDP2-sharded weights exactly.

Run under real ``torchrun`` (gloo, 2 CPU processes): two tiny Llamas with different weights,
each sharded with FSDP2 ``fully_shard`` per decoder layer and at the root (as verl's fsdp2
engine shards the actor and the reference); after ``copy_parameters(actor, ref)`` every
gathered parameter and the logits of both models are equal, and each rank touched only its
own shard (no collective). Run as a script (``torchrun ... tests/test_verl_anchor_copy.py OUT``)
it is the worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _worker(out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import LlamaConfig, LlamaForCausalLM

    from rpgrl.integrations.verl_anchor import copy_parameters

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False)

    def build(seed: int):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).float()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model

    actor, ref = build(1), build(2)
    ids = torch.arange(10).view(1, 10)
    with torch.no_grad():
        before = (actor(ids).logits - ref(ids).logits).abs().max().item()
        def full(p):
            return (p.full_tensor() if isinstance(p, DTensor) else p.detach()).clone()

        actor_before = {n: full(p) for n, p in actor.named_parameters()}
        copied = copy_parameters(actor, ref)
        diff = max((full(a) - full(r)).abs().max().item()
                   for (_, a), (_, r) in zip(actor.named_parameters(), ref.named_parameters()))
        after = (actor(ids).logits - ref(ids).logits).abs().max().item()
        actor_unchanged = all(torch.equal(full(p), actor_before[n]) for n, p in actor.named_parameters())
        sharded = sum(isinstance(p, DTensor) and p.to_local().shape != p.shape for p in ref.parameters())
    if rank == 0:
        Path(out).write_text(json.dumps(dict(before=before, after=after, diff=diff, copied=copied,
                                             n=len(list(ref.parameters())), sharded=sharded,
                                             actor_unchanged=actor_unchanged)))
    dist.destroy_process_group()


@pytest.mark.medium
def test_copy_parameters_between_fsdp2_models_under_torchrun(tmp_path):
    pytest.importorskip("verl", reason="verl is not installed")
    out = tmp_path / "copy.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", VERL_USE_EXTERNAL_PLUGINS="none")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    got = json.loads(out.read_text())
    assert got["before"] > 1e-3  # the two models really differed
    assert got["copied"] == got["n"] and got["sharded"] >= got["n"] // 2  # most parameters are split over 2 ranks
    assert got["diff"] == 0.0 and got["after"] == 0.0 and got["actor_unchanged"]


if __name__ == "__main__":
    from rpgrl.parallel.distributed import exit_process

    _worker(sys.argv[1])
    exit_process(0)  # skip finalization: a gloo thread can abort it (exit_process)
