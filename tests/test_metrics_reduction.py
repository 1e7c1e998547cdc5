"""How metrics combine: one declared rule (``rpgrl.loop.metrics.MAX_METRICS`` / ``SUM_METRICS``)
for a rank's micro- and mini-batches and for the ranks of a torchrun job.

Run as a script (``torchrun ... tests/test_metrics_reduction.py OUT overrides...``) this file
is the worker of the 2-process test: the real trainer trains, and each rank also keeps the
``actor/importance_weight_max`` its own update returned before the cross-rank reduction.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rpgrl.loop import metrics as M
from rpgrl.parallel.distributed import reduce_metrics
from rpgrl.losses import METRIC_KEYS

ROOT = Path(__file__).resolve().parents[1]
PARITY = f"reward_fn={Path(__file__).resolve().parent / 'scorers.py'}:parity"
IW_MAX = "actor/importance_weight_max"


def test_the_loss_max_metrics_are_declared_max():
    """Every ``*_max`` loss metric is reduced by max, by the declared set (not a name rule)."""
    assert IW_MAX in M.MAX_METRICS
    assert {M.actor(k) for k in METRIC_KEYS if k.endswith("_max")} <= set(M.MAX_METRICS)


def test_kl_share_is_the_ratio_of_the_global_token_sums():
    """actor/kl_share = sum|C_KL| / sum|w A| over every token of the step on every rank: the two
    token sums are summed over micro-batches and ranks, then divided (and dropped)."""
    num, den = M.KL_SHARE_SUMS
    rank0, rank1 = M.UpdateMetrics(), M.UpdateMetrics()
    for acc, parts in ((rank0, [(0.01, 0.5, 30), (0.03, 0.1, 10)]), (rank1, [(0.02, 0.2, 20)])):
        for kl_mean, pg_mean, tokens in parts:  # token means of one micro-batch and its tokens
            acc.add(num, kl_mean * tokens)
            acc.add(den, pg_mean * tokens)
    out = M.with_kl_share(reduce_metrics([rank0.values, rank1.values], sum_prefixes=M.SUM_METRICS))
    assert out == {M.KL_SHARE: pytest.approx((0.3 + 0.3 + 0.4) / (15 + 1 + 4))}
    assert M.with_kl_share({num: 0.5, den: 0.0}) == {}  # no reward signal: no share
    assert M.with_kl_share({"x": 1.0}) == {"x": 1.0}


def test_update_metrics_weight_means_and_keep_maxima():
    """Two optimizer steps (share 1/2) of two micro-batches holding 3 and 1 of 4 tokens."""
    acc = M.UpdateMetrics()
    for mean, iw_max, w in ((0.2, 1.5, 0.75), (0.6, 1.1, 0.25), (1.0, 0.9, 0.75), (-1.0, 2.5, 0.25)):
        acc.add(M.KL_ANCHOR, mean, w, 0.5)
        acc.add(IW_MAX, iw_max, w, 0.5)  # a max is not weighted
    acc.add(M.GRAD_NORM, 3.0 / 2)
    acc.add(M.GRAD_NORM, 5.0 / 2)
    # step 1: 0.2 * 0.75 + 0.6 * 0.25 = 0.3; step 2: 0.75 - 0.25 = 0.5; mean 0.4
    assert acc.values[M.KL_ANCHOR] == pytest.approx(0.4, abs=1e-15)
    assert acc.values[IW_MAX] == 2.5
    assert acc.values[M.GRAD_NORM] == 4.0


def test_ranks_combine_by_the_same_rule():
    per_rank = [{IW_MAX: 1.25, M.LENGTH_MAX: 6, M.KL_ANCHOR: 0.5, M.LOSS: 0.25},
                {IW_MAX: 3.0, M.LENGTH_MAX: 4, M.KL_ANCHOR: 0.25, M.LOSS: 0.5}]
    out = reduce_metrics(per_rank, sum_prefixes=M.SUM_METRICS, max_keys=M.MAX_METRICS)
    assert out == {IW_MAX: 3.0, M.LENGTH_MAX: 6, M.KL_ANCHOR: 0.375, M.LOSS: 0.75}


def _torchrun(*args: str, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{out[-6000:]}"
    return out


@pytest.mark.medium
def test_importance_weight_max_is_the_max_over_ranks(tiny_overrides, tmp_path):
    """2 processes, 2 steps of 2 optimizer steps each: the second mini-batch is off-policy, so
    each rank has its own importance-weight maximum; metrics.jsonl logs the larger one (it
    used to log their mean, hiding the rank whose weights blew up)."""
    from rpgrl.loop.tracking import read_metrics

    out, record = tmp_path / "run", tmp_path / "per_rank.json"
    _torchrun(__file__, str(record), *tiny_overrides(PARITY, "eval.before_training=false", "optim.lr=1e-3", out=out))
    per_rank = json.loads(record.read_text())  # [rank][step]: each rank's own update metric
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "actor/loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and [len(v) for v in per_rank] == [2, 2]
    for step, row in enumerate(rows):
        assert row["actor/optimizer_steps"] == 2
        mine = [per_rank[0][step], per_rank[1][step]]
        assert mine[0] != mine[1]  # the ranks trained on different responses
        assert row[IW_MAX] == max(mine)


def _worker(record_path: str, *overrides: str) -> None:
    from rpgrl.config import load_config
    from rpgrl.loop.trainer import Trainer

    class Recording(Trainer):
        """The real trainer; also keeps what this rank's update returned, before ``step``
        reduces it over the ranks."""

        own: list[float] = []

        def update(self, batch):
            metrics = super().update(batch)
            self.own.append(metrics[IW_MAX])
            return metrics

    t = Recording(load_config(overrides=list(overrides)), log=lambda *a, **k: None)
    t.train()
    per_rank = t.dist.all_gather_object(t.own)
    if t.dist.is_main:
        Path(record_path).write_text(json.dumps(per_rank))
    t.dist.barrier()


if __name__ == "__main__":
    from rpgrl.parallel.distributed import exit_process

    _worker(*sys.argv[1:])
    exit_process(0)  # skip finalization: a gloo thread can abort it (exit_process)
