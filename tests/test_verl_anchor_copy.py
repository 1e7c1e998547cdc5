"""The anchor refresh of rpgrl.integrations.verl_anchor copies FSDP-sharded weights exactly.

Run under real ``torchrun`` (gloo, 2 CPU processes): for every layout verl's engines can give the
actor and the reference -- FSDP1 (verl's default ``strategy=fsdp``) with ``use_orig_params`` false
and true, FSDP2 (``fsdp2``); the reference with and without CPU parameter offload (verl always
offloads its forward-only reference: FSDP1 ``CPUOffload``, FSDP2 ``CPUOffloadPolicy``); bf16 mixed
precision or fp32 compute; tied and untied embeddings -- two tiny Llamas with different weights
are wrapped per decoder layer and at the root (as verl wraps them), *both run a no-grad forward*
(as ``compute_log_prob`` / ``compute_ref_log_prob`` do every batch, leaving FSDP1's root unit
unsharded), then ``copy_shards(actor, ref)``. After it the logits of both are identical
(max |diff| = 0.0), every gathered parameter has the same bytes, and the actor is unchanged.

The same file checks the layout guard: engines sharded differently are refused by
``check_refresh_layout`` (what ``init_model`` calls), not at the first refresh.

Run as a script (``torchrun ... tests/test_verl_anchor_copy.py OUT``) it is the worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("fsdp1", "fsdp1_orig_params", "fsdp2")
CASES = [dict(strategy=s, ref_offload=o, bf16=b, tied=t)
         for s, o, b, t in product(STRATEGIES, (False, True), (False, True), (False, True))]


def _worker(out: str) -> None:
    import functools

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffload, CPUOffloadPolicy, MixedPrecision, MixedPrecisionPolicy, fully_shard
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from torch.distributed.tensor import DTensor
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from rpgrl.integrations.verl_anchor import check_refresh_layout
    from rpgrl.integrations.verl_cpu.cpu_platform import unpinned_host_memory
    from rpgrl.parallel.shards import copy_shards

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    unpinned_host_memory()  # FSDP1's CPUOffload pins host memory, which needs an accelerator

    def build(seed: int, case: dict, *, forward_only: bool):
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                          tie_word_embeddings=case["tied"])
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).float()
        offload = forward_only and case["ref_offload"]
        if case["strategy"].startswith("fsdp1"):
            mp = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                buffer_dtype=torch.float32) if case["bf16"] else None
            policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
            from torch.distributed.fsdp import ShardingStrategy

            return FSDP(model, auto_wrap_policy=policy, device_id=torch.device("cpu"), mixed_precision=mp,
                        sharding_strategy=ShardingStrategy[case.get("sharding", "FULL_SHARD")],
                        use_orig_params=case["strategy"] == "fsdp1_orig_params",
                        cpu_offload=CPUOffload(offload_params=True) if offload else None)
        kw = dict(offload_policy=CPUOffloadPolicy(pin_memory=False)) if offload else {}
        if case["bf16"]:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        return model

    def full_params(model) -> dict:
        if isinstance(model, FSDP):
            with FSDP.summon_full_params(model, writeback=False):
                return {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone() for n, p in model.named_parameters()}
        return {n: (p.full_tensor() if isinstance(p, DTensor) else p.detach()).clone() for n, p in model.named_parameters()}

    ids = torch.arange(12).view(2, 6)
    results = []
    for case in CASES:
        actor, ref = build(1, case, forward_only=False), build(2, case, forward_only=True)
        # a training step on the actor, then the no-grad forwards of compute_log_prob / compute_ref_log_prob
        opt = torch.optim.AdamW(actor.parameters(), lr=1e-2)
        actor(ids).logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            before = (actor(ids).logits.float() - ref(ids).logits.float()).abs().max().item()
            actor_before = full_params(actor)
            check_refresh_layout(actor, ref)
            copied = copy_shards(actor, ref)
            after = (actor(ids).logits.float() - ref(ids).logits.float()).abs().max().item()
            a, r = full_params(actor), full_params(ref)
            same_bytes = sorted(a) == sorted(r) and all(
                a[n].dtype == r[n].dtype and torch.equal(a[n].view(torch.uint8), r[n].view(torch.uint8)) for n in a)
            actor_unchanged = all(torch.equal(actor_before[n], a[n]) for n in a)
            # ... and the reference keeps computing with the copied weights on the next batch
            again = (actor(ids).logits.float() - ref(ids).logits.float()).abs().max().item()
        results.append(dict(case=case, before=before, after=after, again=again, copied=copied,
                            same_bytes=same_bytes, actor_unchanged=actor_unchanged))

    # engines sharded differently are refused before any copy, naming the difference
    refused = []
    for a_case, r_case in ((dict(CASES[0], strategy="fsdp2"), CASES[0]),     # FSDP2 actor, FSDP1 reference
                           (CASES[0], dict(CASES[0], sharding="NO_SHARD")),  # e.g. another fsdp_size
                           (dict(CASES[0], strategy="fsdp2"), dict(CASES[0], strategy="fsdp2", tied=True))):
        try:
            check_refresh_layout(build(1, a_case, forward_only=False), build(2, r_case, forward_only=True))
            refused.append("")
        except ValueError as e:
            refused.append(str(e))
    if rank == 0:
        Path(out).write_text(json.dumps(dict(results=results, refused=refused)))
    dist.barrier()


@pytest.mark.medium
def test_refresh_copies_every_fsdp_layout_exactly_after_a_forward(tmp_path):
    pytest.importorskip("verl", reason="verl is not installed")
    out = tmp_path / "copy.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", VERL_USE_EXTERNAL_PLUGINS="none")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    got = json.loads(out.read_text())
    assert len(got["results"]) == len(CASES) == 24
    for res in got["results"]:
        assert res["before"] > 1e-3, res  # the two models really differed
        assert res["after"] == 0.0 and res["again"] == 0.0, res  # identical logits, on this batch and the next
        assert res["same_bytes"] and res["actor_unchanged"], res
        assert res["copied"] >= 1, res
    fsdp2_vs_fsdp1, no_shard, tied = got["refused"]
    assert "actor_rollout_ref.ref.fsdp_config.strategy=fsdp2" in fsdp2_vs_fsdp1, fsdp2_vs_fsdp1
    assert "fsdp_size" in no_shard and "_flat_param: shard" in no_shard, no_shard
    assert "different parameters" in tied, tied


if __name__ == "__main__":
    from rpgrl.parallel.distributed import exit_process

    _worker(sys.argv[1])
    exit_process(0)  # skip finalization: a gloo thread can abort it (exit_process)
