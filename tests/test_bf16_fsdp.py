"""bf16 mixed precision under FSDP2 (2 gloo processes via torchrun, docs/precision.md):
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` on the decoder layers, fp32
sharded parameters and optimizer state, an fp32 root (LM head), fp32 log-probs and w = 1 on
the first on-policy mini-batch, fp32 checkpoints.

Run as a script (``torchrun ... tests/test_bf16_fsdp.py OUT overrides...``) this file is the
worker: each rank trains one step, recording what the contract is about, and writes it to
``OUT.rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_distributed import PARITY, _torchrun
from test_precision import W_BOUND, accuracy_before_after, assert_learns_like_fp32, learn_overrides

pytestmark = pytest.mark.medium


def test_fsdp_bf16_keeps_fp32_master_weights_and_w_one(tiny_overrides, tmp_path):
    """Two mini-batches, so pi_old comes from the separate no-grad pass through the sharded
    policy (the same MixedPrecisionPolicy as the update's forward)."""
    out = tmp_path / "run"
    over = tiny_overrides(PARITY, "model.dtype=bfloat16", "trainer.fsdp=true", "trainer.total_steps=1",
                          "trainer.save_every=1", "eval.before_training=false", "optim.lr=1e-5", out=out)
    log = _torchrun(__file__, str(tmp_path / "report"), *over, timeout=300)
    assert "precision: bf16 mixed precision" in log
    for rank in (0, 1):
        r = json.loads((tmp_path / f"report.rank{rank}.json").read_text())
        assert r["sharded_param_dtypes"] == ["torch.float32"]  # fp32 master shards
        assert r["grad_dtypes"] == ["torch.float32"]  # reduce-scattered in fp32
        assert r["optimizer_state_dtypes"] == ["torch.float32"]
        assert r["layer_output_dtypes"] == ["torch.bfloat16"]  # decoder compute in bf16
        assert r["lm_head_output_dtypes"] == ["torch.float32"]  # sampler's logits: fp32 root
        assert r["logp_dtypes"] == ["torch.float32"]
        assert r["logprob_passes"] == 1 and r["first_mini_batch_calls"] == 1  # 4 rows per rank
        print(f"rank {rank}: max |log w| on the first mini-batch {r['max_abs_log_w']:.3g}")
        assert r["max_abs_log_w"] <= W_BOUND
        assert r["moved"] > 0.5 * r["params"]  # an lr-1e-5 step moved the fp32 shards
    ckpt = out / "checkpoints" / "step_000001"
    for path in (ckpt / "model.safetensors", out / "final" / "model.safetensors"):
        assert {v.dtype for v in load_file(path).values()} == {torch.float32}, path
    osd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert {v.dtype for s in osd["state"].values() for v in s.values() if v.dim() > 0} == {torch.float32}


def test_fsdp_bf16_learns_like_fp32(warmstart_cache, tmp_path):
    """The shrunk CPU default (``test_precision.LEARN``) under FSDP2 on 2 gloo processes, in
    fp32 and in bf16 mixed precision: both learn, bf16 as well as fp32 (thresholds and the
    measured gains: ``test_precision.MIN_GAIN``)."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        _torchrun("-m", "rpgrl", "train", *learn_overrides(warmstart_cache, out, f"model.dtype={dtype}",
                                                            "trainer.fsdp=true"), timeout=600)
        runs[dtype] = accuracy_before_after(out)
    print(runs)
    assert_learns_like_fp32(runs["float32"], runs["bfloat16"])


def _worker(report: str, *overrides: str) -> None:
    from torch.distributed.tensor import DTensor

    from rpgrl.config import load_config
    from rpgrl.loop.trainer import Trainer

    t = Trainer(load_config(overrides=list(overrides)), log=print)
    rank = t.dist.rank
    seen: dict[str, set] = {"layer": set(), "head": set(), "logp": set()}
    t.model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, o: seen["layer"].add(str(o.dtype)))
    t.model.lm_head.register_forward_hook(lambda m, a, o: seen["head"].add(str(o.dtype)))
    calls: list[float] = []

    class Recording:  # the trainer's loss, recording |log w| of each micro-batch
        def __init__(self, loss):
            self.loss = loss

        def __getattr__(self, name):
            return getattr(self.loss, name)

        def __call__(self, logp, old, adv, mask, *rest, **kw):
            seen["logp"] |= {str(logp.dtype), str(old.dtype)}
            calls.append(float((logp.detach() - old)[mask.bool()].abs().max()))
            return self.loss(logp, old, adv, mask, *rest, **kw)

    t.loss = Recording(t.loss)
    first: list[int] = []
    grads: set[str] = set()

    def before_step(*_a):
        if not first:
            first.append(len(calls))
            grads.update(str(p.grad.dtype) for p in t.model.parameters() if p.grad is not None)

    t.optimizer.register_step_pre_hook(before_step)
    start = {n: p.detach().to_local().clone() for n, p in t.model.named_parameters()}
    t.train()
    moved = sum(int((p.detach().to_local() != start[n]).sum()) for n, p in t.model.named_parameters())
    Path(f"{report}.rank{rank}.json").write_text(json.dumps({
        "sharded_param_dtypes": sorted({str(p.dtype) for p in t.model.parameters() if isinstance(p, DTensor)}),
        "grad_dtypes": sorted(grads),
        "optimizer_state_dtypes": sorted({str(v.dtype) for s in t.optimizer.state.values() for v in s.values()
                                          if v.dim() > 0}),
        "layer_output_dtypes": sorted(seen["layer"]), "lm_head_output_dtypes": sorted(seen["head"]),
        "logp_dtypes": sorted(seen["logp"]), "logprob_passes": t._logprob_passes,
        "first_mini_batch_calls": first[0], "max_abs_log_w": max(calls[:first[0]]),
        "moved": moved, "params": sum(v.numel() for v in start.values()),
    }))


if __name__ == "__main__":
    from rpgrl.parallel.distributed import exit_process

    _worker(*sys.argv[1:])
    exit_process(0)  # skip finalization: a gloo thread can abort it (exit_process)
