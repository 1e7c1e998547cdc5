"""FSDP ranks make the same decoder calls whatever their data (real ``torchrun``, gloo, 2 CPU
processes, FSDP2 ``fully_shard`` of a 2-layer Llama in float64).

Under ``trainer.fsdp=true`` every decoder call all-gathers each layer's weights and every call
in the autograd graph reduce-scatters its gradients, so a rank that makes one call fewer than
the others pairs its collectives with the wrong ones and the run hangs (or, where the layers'
shapes agree, silently all-gathers the wrong layer). Each scenario below gives rank 1 a
micro-batch that used to take a different path from rank 0's: responses that are all one token
long, prompts that never repeat, responses that are all empty, no response column at all, and
per-row response starts that happen to be equal on rank 0 only. Each run must finish (collective
timeout 60 s, so a hang fails the test) with log-probs, entropies and summed gradients equal to
the unsharded 1-process values on the same batches.

Run as a script (``torchrun ... tests/test_fsdp_consistency.py STATE SCENARIO OUT``) this file
is the worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
P = 5

# rank 0 in every scenario: 3 prompts (2 left-padded) x 2 responses of lengths 1..5 (repeats)
_PROMPTS = [([0, 0, 7, 8, 9], [0, 0, 1, 1, 1]), ([3, 4, 5, 6, 7], [1, 1, 1, 1, 1]),
            ([0, 11, 12, 13, 14], [0, 1, 1, 1, 1]), ([0, 0, 0, 40, 41], [0, 0, 0, 1, 1])]
_RESPONSES = [[10, 11, 12, 1, 0], [13, 1, 0, 0, 0], [20, 21, 22, 23, 24], [25, 26, 1, 0, 0],
              [27, 28, 29, 30, 1], [31, 0, 0, 0, 0]]


def _rows(prompts: list[int], responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``_PROMPTS[prompts[i]] + responses[i]``; a response token 0 is padding."""
    ids, mask = [], []
    for p, r in zip(prompts, responses):
        p_ids, p_mask = _PROMPTS[p]
        ids.append(p_ids + r)
        mask.append(p_mask + [int(t != 0) for t in r])
    return torch.tensor(ids), torch.tensor(mask)


def _batches(scenario: str) -> list[tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]]:
    """(input_ids, attention_mask, response_start) of rank 0 and rank 1."""
    ids0, mask0 = _rows([0, 0, 1, 1, 2, 2], _RESPONSES)
    rank0 = (ids0, mask0, P)
    if scenario == "one_token":  # rank 1: every response is an immediate EOS (1 token wide)
        ids1, mask1 = _rows([0, 0, 1, 1], [[1, 0, 0]] * 4)
    elif scenario == "no_repeats":  # rank 1: every prompt appears once
        ids1, mask1 = _rows([0, 1, 2, 3], _RESPONSES[:4])
    elif scenario == "empty":  # rank 1: every response is empty (no real response token)
        ids1, mask1 = _rows([0, 0, 1, 3], [[0, 0, 0]] * 4)
    elif scenario == "no_response_columns":  # rank 1: the response block has width 0
        ids1, mask1 = _rows([0, 0, 1, 2], [[]] * 4)
    elif scenario == "per_row_starts":  # per-row starts, equal on rank 0 only
        rank0 = (ids0, mask0, torch.full((ids0.shape[0],), P))
        ids1, mask1 = _rows([0, 0, 1, 2], [_RESPONSES[0], _RESPONSES[2], _RESPONSES[3], _RESPONSES[4]])
        return [rank0, (ids1, mask1, torch.tensor([P, P + 1, P + 2, P]))]
    else:
        raise ValueError(scenario)
    return [rank0, (ids1, mask1, P)]


SCENARIOS = ("one_token", "no_repeats", "empty", "no_response_columns", "per_row_starts")


def _model():
    from hf_tiny import tiny_causal_lm

    return tiny_causal_lm("llama").double()


def _upstream(lp: torch.Tensor) -> torch.Tensor:
    """Fixed per-token weights of the test loss (sum(lp * up)), no random draws."""
    return torch.linspace(-1.0, 2.0, lp.numel(), dtype=lp.dtype).view_as(lp)


def _one_process(state: dict, scenario: str) -> dict:
    """The unsharded values: log-probs, entropies per rank, gradients summed over the ranks
    (FSDP's reduce-scatter sums them: ``shard_policy`` sets the divide factor to 1)."""
    from rpgrl.models.logprobs import sequence_logprobs

    model = _model()
    model.load_state_dict(state)
    out: dict = {"lp": [], "ent": []}
    for ids, mask, start in _batches(scenario):
        lp, ent = sequence_logprobs(model, ids, mask, start, with_entropy=True)
        (lp * _upstream(lp)).sum().backward()
        out["lp"].append(lp.detach())
        out["ent"].append(ent)
    out["grads"] = {k: p.grad for k, p in model.named_parameters()}
    return out


def _worker(state_path: str, scenario: str, out_path: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from rpgrl.parallel.distributed import exit_process
    from rpgrl.parallel.fsdp import logprobs_fn, shard_policy

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    model = _model()
    model.load_state_dict(torch.load(state_path, weights_only=True))
    shard_policy(model)
    calls = []
    model.get_decoder().register_forward_hook(lambda *_: calls.append(1))
    fn = logprobs_fn(model)
    ids, mask, start = _batches(scenario)[rank]
    with torch.no_grad():  # the pi_old pass: forward collectives only
        lp_nograd, _ = fn(ids, mask, start)
    lp, ent = fn(ids, mask, start, with_entropy=True)
    (lp * _upstream(lp)).sum().backward()
    grads = {k: p.grad.full_tensor() for k, p in model.named_parameters()}
    mine = {"lp": lp.detach(), "lp_nograd": lp_nograd, "ent": ent, "calls": len(calls)}
    got = [None, None]
    dist.all_gather_object(got, mine)
    if rank == 0:
        torch.save({"ranks": got, "grads": grads}, out_path)
    dist.barrier()
    dist.destroy_process_group()
    exit_process(0)  # not interpreter finalization, where a gloo thread can abort the run


@pytest.mark.medium
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fsdp_ranks_with_different_data_agree_with_one_process(scenario, tmp_path):
    torch.manual_seed(0)
    state = _model().state_dict()
    torch.save(state, tmp_path / "state.pt")
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(tmp_path / "state.pt"), scenario, str(tmp_path / "out.pt")]
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in 300 s (a collective hang):\n{str(e.stdout)[-3000:]}")
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{(r.stdout + r.stderr)[-6000:]}"
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    want = _one_process(state, scenario)
    ranks = got["ranks"]
    assert ranks[0]["calls"] == ranks[1]["calls"]  # the invariant itself
    for rank, r_got in enumerate(ranks):
        assert r_got["lp"].shape == want["lp"][rank].shape
        torch.testing.assert_close(r_got["lp"], want["lp"][rank], rtol=0, atol=1e-10, msg=f"rank {rank}")
        torch.testing.assert_close(r_got["lp_nograd"], want["lp"][rank], rtol=0, atol=1e-10)
        torch.testing.assert_close(r_got["ent"], want["ent"][rank], rtol=0, atol=1e-10)
    assert want["lp"][0].std() > 0.3  # peaked init: real, varied log-probs
    moved = 0
    for k, w in want["grads"].items():
        g = got["grads"][k]
        # HF's RMSNorm computes in float32 inside the float64 model: agreement to 1e-6 of the
        # largest entry (tests/test_prefix.py); a missing or doubled contribution is O(1)
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6 * float(w.abs().max()) + 1e-12, msg=k)
        moved += int(w.abs().max() > 0)
    assert moved == len(want["grads"])  # every parameter has a gradient


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _worker(*sys.argv[1:])
