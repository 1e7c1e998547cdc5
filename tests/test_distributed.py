"""Data parallelism under real ``torchrun`` (gloo, 2 CPU processes): a full run writes its
outputs once, resumes, and one distributed update equals the 1-process update on the same
global batch.

Run as a script (``torchrun ... tests/test_distributed.py BATCH OUT overrides...``) this file
is the parity worker: each rank takes its block of a batch collected by a 1-process
Trainer, recomputes the (globally whitened) advantages, applies one update and rank 0
writes the parameters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
PARITY = f"reward_fn={Path(__file__).resolve().parent / 'scorers.py'}:parity"
# where a test needs a gradient at every step: ties only for identical 4-token prefixes
# (tests/informative.py), not ~20 % of groups as with parity
PREFIX_RANK = "reward_fn=rpgrl.integrations.verl_cpu.reward:compute_score"


def _quiet(*_a, **_k):
    pass


def _torchrun(*args: str, timeout: float = 120) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{out[-6000:]}"
    return out


# ----------------------------------------------------------------------------- units (no processes)

def test_reduce_metrics_sums_counts_means_the_rest():
    from rpgrl.parallel.distributed import reduce_metrics

    per_rank = [{"actor/loss": 0.25, "batch/kept_groups": 2, "reward/mean": 0.5, "len/max": 3,
                 "optim/lr": 1e-3, "actor/optimizer_steps": 2, "algo": "x"},
                {"actor/loss": -0.75, "batch/kept_groups": 2, "reward/mean": 0.0, "len/max": 7,
                 "optim/lr": 1e-3, "actor/optimizer_steps": 2, "algo": "x"}]
    out = reduce_metrics(per_rank, sum_prefixes=("actor/loss", "batch/"), max_keys=("len/max",))
    assert out == {"actor/loss": -0.5, "batch/kept_groups": 4, "reward/mean": 0.25, "len/max": 7,
                   "optim/lr": 1e-3, "actor/optimizer_steps": 2, "algo": "x"}
    assert isinstance(out["actor/optimizer_steps"], int)


# ----------------------------------------------------------------------------- torchrun

def _train_rows(out: Path) -> list[dict]:
    from rpgrl.loop.tracking import read_metrics

    return [r for r in read_metrics(out / "metrics.jsonl") if "actor/loss" in r]


@pytest.mark.medium
def test_two_processes_train_write_once_and_resume(tiny_overrides, tmp_path):
    out = tmp_path / "run"
    log = _torchrun("-m", "rpgrl", "train", *tiny_overrides(PREFIX_RANK, "trainer.save_every=1", out=out))
    assert log.count("held-out accuracy before RL") == 1  # only rank 0 logs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2
    assert (out / "final" / "model.safetensors").is_file() and (out / "curves.png").is_file()
    rows = _train_rows(out)
    assert [r["step"] for r in rows] == [1, 2]  # one line per step: rank 1 writes nothing
    for r in rows:  # counts are summed over the 2 ranks: 4 prompts x 4 samples in all
        assert r["batch/kept_groups"] == 4 and r["reward/n"] == 16
        assert r["actor/optimizer_steps"] == 2 and r["actor/grad_norm"] > 0
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_000001", "step_000002"]
    state = torch.load(out / "checkpoints" / "step_000002" / "trainer_state.pt", weights_only=True)
    assert len(state["rng_per_rank"]) == 2  # each rank's sampler state, not only rank 0's
    assert not torch.equal(state["rng_per_rank"][0]["torch"], state["rng_per_rank"][1]["torch"])

    log = _torchrun("-m", "rpgrl", "train", *tiny_overrides(PREFIX_RANK, "trainer.save_every=1",
                                                            "trainer.total_steps=3", out=out), "--resume")
    assert "at step 2" in log and log.count("resumed from") == 1
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    resumed = _train_rows(out)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert resumed[:2] == rows  # steps 1-2 kept as written, step 3 appended
    assert (out / "checkpoints" / "step_000003" / "manifest.json").is_file()

    # exact: every rank restored its own RNG, so the resumed run is the uninterrupted one
    full = tmp_path / "full"
    _torchrun("-m", "rpgrl", "train", *tiny_overrides(PREFIX_RANK, "trainer.total_steps=3",
                                                      "eval.before_training=false", out=full))
    a = load_file(full / "final" / "model.safetensors")
    b = load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["actor/loss"] for r in _train_rows(full)] == [r["actor/loss"] for r in resumed]


@pytest.mark.medium
def test_distributed_update_equals_one_process_update(tiny_overrides, tmp_path):
    from rpgrl.config import load_config
    from rpgrl.loop.trainer import Trainer

    # one mini-batch (prompts_per_step == mini_batch_prompts): both runs step on the same sequences;
    # reinforce_pp_baseline whitens over the whole batch, so the 2-process path must gather
    extra = (PREFIX_RANK, "trainer.prompts_per_step=4", "trainer.mini_batch_prompts=4", "trainer.micro_batch_sequences=4",
             "algorithm.advantage=reinforce_pp_baseline", "algorithm.anchor.mode=fixed",
             "algorithm.beta=0.05", "optim.lr=1e-3")
    t = Trainer(load_config(overrides=tiny_overrides(*extra, out=tmp_path / "one")), log=_quiet)
    batch, _ = t.collect()
    t.prepare(batch)
    assert batch.advantages.abs().sum() > 0 and batch.anchor_logp is not None
    assert batch.old_logp is None  # one optimizer step per batch: update's first forward gives them
    torch.save(batch, tmp_path / "batch.pt")
    start = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
    one = t.update(batch)
    p1 = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
    g1 = {k: p.grad.detach().clone() for k, p in t.model.named_parameters() if p.grad is not None}

    _torchrun(__file__, str(tmp_path / "batch.pt"), str(tmp_path / "two.pt"),
              *tiny_overrides(*extra, out=tmp_path / "two"))
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    # the gathered whitening equals the 1-process whitening, row for row
    torch.testing.assert_close(two["advantages"], batch.advantages, atol=1e-6, rtol=0)
    # the all-reduced gradient is the 1-process gradient up to fp32 round-off of sums taken in
    # another order (measured: 1.4e-7 x the largest entry)
    gtol = 1e-6 * max(float(g.abs().max()) for g in g1.values())
    assert two["grads"].keys() == g1.keys()
    for k, g in g1.items():
        torch.testing.assert_close(two["grads"][k], g, atol=gtol, rtol=0, msg=lambda m, k=k: f"grad {k}: {m}")
    moved, ill = 0.0, 0
    for k, v in p1.items():
        # Adam's first step is lr * g / (|g| + eps), about lr * sign(g): an entry whose gradient is
        # within that round-off of 0 may step either way, so compare every other entry
        g = g1.get(k)
        sure = torch.ones_like(v, dtype=torch.bool) if g is None else g.abs() > gtol
        ill += int((~sure).sum())
        torch.testing.assert_close(two["params"][k][sure], v[sure], atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
        moved = max(moved, float((v - start[k]).abs().max()))
    assert ill < 0.01 * sum(v.numel() for v in p1.values())  # only a few entries are that close to 0
    assert moved > 1e-4  # the step did move the parameters
    assert two["metrics"]["actor/loss"] == pytest.approx(one["actor/loss"], abs=1e-6)
    assert two["metrics"]["actor/grad_norm"] == pytest.approx(one["actor/grad_norm"], rel=1e-5)


@pytest.mark.medium
def test_fsdp_run_equals_replicated_run_and_resumes(tiny_overrides, tmp_path):
    """trainer.fsdp=true (FSDP2 fully_shard, gloo) trains the same 2 steps as the replicated
    all-reduce path: generation runs on gathered full weights, gradients are summed, and the
    gathered checkpoint has the unsharded layout (same keys, optimizer indexed alike). A
    periodic anchor (period 1) exercises the anchor refresh from the sharded policy."""
    extra = (PARITY, "trainer.save_every=1", "eval.before_training=false",
             "algorithm.anchor.mode=periodic", "algorithm.anchor.period_optimizer_steps=1")
    base, fsdp = tmp_path / "base", tmp_path / "fsdp"
    _torchrun("-m", "rpgrl", "train", *tiny_overrides(*extra, out=base))
    _torchrun("-m", "rpgrl", "train", *tiny_overrides(*extra, "trainer.fsdp=true", out=fsdp))

    def assert_same_weights(a_path: Path, b_path: Path) -> None:
        a, b = load_file(a_path), load_file(b_path)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")

    assert_same_weights(base / "final" / "model.safetensors", fsdp / "final" / "model.safetensors")
    ckpt = Path("checkpoints") / "step_000002"
    assert_same_weights(base / ckpt / "model.safetensors", fsdp / ckpt / "model.safetensors")
    oa = torch.load(base / ckpt / "optimizer.pt", weights_only=True)
    ob = torch.load(fsdp / ckpt / "optimizer.pt", weights_only=True)
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i, st in oa["state"].items():
        for k, v in st.items():
            torch.testing.assert_close(ob["state"][i][k], v, atol=1e-5, rtol=0, msg=f"{i}.{k}")
    la, lb = _train_rows(base), _train_rows(fsdp)
    assert [r["actor/loss"] for r in lb] == pytest.approx([r["actor/loss"] for r in la], abs=1e-6)
    assert lb[-1]["anchor/refreshes"] == la[-1]["anchor/refreshes"] == 3  # after steps 1, 2, 3 of 4

    # resume the FSDP run from its step-1 checkpoint: step 2 is redone, on the same weights
    import shutil
    shutil.rmtree(fsdp / ckpt)
    log = _torchrun("-m", "rpgrl", "train", *tiny_overrides(*extra, "trainer.fsdp=true", out=fsdp),
                    "--resume")
    assert "at step 1" in log
    assert_same_weights(base / "final" / "model.safetensors", fsdp / "final" / "model.safetensors")


@pytest.mark.medium
def test_dynamic_sampling_ranks_agree_on_kept_groups(tiny_overrides, tmp_path):
    """Dynamic sampling under torchrun: rank 1 scores everything 0.0, so only rank 0 keeps
    groups of its own. The ranks still stop after the same generation round, split the kept
    groups evenly (rank 1 trains on rank 0's responses, scores travelling with them) and take
    the same number of optimizer steps."""
    scorer = f"reward_fn={Path(__file__).resolve().parent / 'scorers.py'}:parity_on_rank0"
    extra = (scorer, "algorithm.dynamic_sampling.enabled=true", "algorithm.dynamic_sampling.max_gen_batches=4")
    _torchrun(__file__, "--collect", str(tmp_path / "ds.json"), *tiny_overrides(*extra, out=tmp_path / "ds"))
    ranks = json.loads((tmp_path / "ds.json").read_text())
    assert len(ranks) == 2 and ranks[0]["gen_batches"] == ranks[1]["gen_batches"]
    n_groups = len(ranks[0]["scores"])
    assert n_groups == len(ranks[1]["scores"]) >= 1
    assert ranks[0]["kept"] + ranks[1]["kept"] == 2 * n_groups
    assert ranks[0]["steps"] == ranks[1]["steps"] == min(2, n_groups)
    for r in ranks:
        assert all(max(g) > min(g) for g in r["scores"])  # only groups whose scores differ
        flat = [x for g in r["scores"] for x in g]
        assert flat == [float(len(t) % 2) for t in r["responses"]]  # rank 0's parity scores


def _collect_worker(out_path: str, *overrides: str) -> None:
    from rpgrl.config import load_config
    from rpgrl.loop.trainer import Trainer

    t = Trainer(load_config(overrides=list(overrides)), log=_quiet)
    batch, metrics = t.collect()
    n = t.cfg.rollout.n
    t.prepare(batch)
    steps = t.update(batch)["actor/optimizer_steps"]
    mine = {"scores": batch.scores.view(-1, n).tolist(), "responses": batch.rollout.responses,
            "kept": metrics["batch/kept_groups"], "gen_batches": metrics["batch/gen_batches"], "steps": steps}
    got = t.dist.all_gather_object(mine)
    if t.dist.is_main:
        Path(out_path).write_text(json.dumps(got))
    t.dist.barrier()


def _parity_worker(batch_path: str, out_path: str, *overrides: str) -> None:
    from rpgrl.config import load_config
    from rpgrl.loop.metrics import MAX_METRICS, SUM_METRICS
    from rpgrl.loop.trainer import Batch, Trainer

    t = Trainer(load_config(overrides=list(overrides)), log=_quiet)
    assert t.dist.world_size == 2
    full = torch.load(batch_path, weights_only=False)
    rows = t.dist.shard(list(range(full.rewards.shape[0])))
    local = Batch(full.rollout.select(rows), full.rewards[rows], full.scores[rows], full.group_ids[rows])
    t.prepare(local)  # advantages through the distributed (gathered) path
    advantages = t.dist.all_gather_object(local.advantages)
    local.advantages = full.advantages[rows]
    local.anchor_logp = full.anchor_logp[rows]
    metrics = t.dist.reduce_metrics(t.update(local), sum_prefixes=SUM_METRICS, max_keys=MAX_METRICS)
    if t.dist.is_main:
        torch.save({"params": {k: v.detach().clone() for k, v in t.model.state_dict().items()},
                    "grads": {k: p.grad.detach().clone() for k, p in t.model.named_parameters() if p.grad is not None},
                    "advantages": torch.cat(advantages), "metrics": metrics}, out_path)
    t.dist.barrier()


if __name__ == "__main__":
    if sys.argv[1] == "--collect":
        _collect_worker(*sys.argv[2:])
    else:
        _parity_worker(*sys.argv[1:])
    from rpgrl.parallel.distributed import exit_process

    exit_process(0)  # skip finalization: a gloo thread can abort it (exit_process)
