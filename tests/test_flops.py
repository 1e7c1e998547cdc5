"""rpgrl.models.flops: the parameter counts and token arithmetic behind model FLOP utilisation."""

from __future__ import annotations

import pytest

from hf_tiny import tiny_causal_lm
from rpgrl.models.flops import PhaseFlops, matmul_params, matmul_peak_gflops


@pytest.mark.parametrize("arch, tied", [("qwen2", True), ("llama", False)])
def test_matmul_params_by_hand(arch, tied):
    model = tiny_causal_lm(arch)  # hidden 32, 2 layers, 4 heads (2 KV heads of 8), MLP 64, vocab 50
    h, kv, mlp, v = 32, 2 * 8, 64, 50
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * mlp  # q, k, v, o, gate/up/down
    body, head = matmul_params(model)
    assert (body, head) == (2 * per_layer, v * h)
    # everything else is the embedding table (counted once when tied), norms and biases
    emb = 0 if tied else v * h
    rest = sum(p.numel() for p in model.parameters()) - body - head - emb
    assert rest == sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1)


def test_phase_flops_arithmetic():
    f = PhaseFlops(tiny_causal_lm("qwen2"))
    b, hd = f.body, f.head
    assert f.forward(10, 4) == 2 * (b * 14 + hd * 4)
    assert f.train(10, 4) == 3 * f.forward(10, 4)
    assert f.generation(10, 4) == f.forward(10, 4)


def test_matmul_peak_is_measured():
    g = matmul_peak_gflops(size=256, seconds=0.05)
    assert 0.1 < g < 1e6


def test_profile_reports_mfu_per_phase(tiny_overrides, capsys):
    """trainer.profile=true: every step logs useful-token counts and a per-phase MFU in (0, 1]
    against the peak measured at start-up; the profile table prints them."""
    import json

    from rpgrl.cli import main

    # the pi_old pass on (else the off-policy tiny run takes pi_old from the sampler: no logprobs phase)
    over = tiny_overrides("trainer.profile=true", "trainer.total_steps=3", "trainer.save_every=3",
                          "rollout.sampler_logprobs=false")
    out = next(o.split("=", 1)[1] for o in over if o.startswith("output_dir="))
    assert main(["train", *over]) == 0
    rows = [json.loads(x) for x in open(f"{out}/metrics.jsonl") if '"mfu/' in x]
    assert len(rows) == 3
    for r in rows:
        assert r["tokens/response"] > 0 and r["tokens/prompt_unique"] > 0
        assert r["mfu/matmul_peak_gflops"] > 0 and r["memory/peak_rss_mb"] > 50
        for phase in ("generation", "forward_backward", "logprobs", "generation_sampled", "forward_backward_scheduled"):
            assert 0 < r[f"mfu/{phase}"] <= 1.0, (phase, r[f"mfu/{phase}"])  # 2 mini-batches: pi_old needs a pass
        # the sampler's work counts every round; the update's, each prompt once per micro-batch
        assert r["tokens/generated"] >= r["tokens/response"]
        assert r["tokens/generation_prompt"] >= r["tokens/prompt_unique"]
        if r["batch/gen_batches"] == 1 and r["batch/kept_groups"] == 4:  # trainer.prompts_per_step=4: all kept
            assert r["tokens/generated"] == r["tokens/response"]
        assert r["tokens/update_prompt"] >= r["tokens/prompt_unique"]
        assert r["mfu/forward_backward_scheduled"] >= r["mfu/forward_backward"]
        assert r["mfu/generation_sampled"] >= r["mfu/generation"]
    printed = capsys.readouterr().out
    assert "model FLOP utilisation" in printed and "forward_backward" in printed and "peak RSS" in printed


def test_scheduled_work_counts_each_prompt_once_per_micro_batch():
    """Hand-counted: two groups (prompts of 3 and 2 real tokens, left-padded) shuffled into two
    micro-batches that each hold both prompts run 2 x (3 + 2) = 10 prompt tokens, not 5; prompts
    that start alike run their common prefix once."""
    import torch

    from rpgrl.loop import metrics as M
    from rpgrl.models.flops import PhaseFlops

    prompt_ids = torch.tensor([[7, 8, 9], [7, 8, 9], [0, 5, 6], [0, 5, 6]])
    prompt_mask = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 1, 1], [0, 1, 1]])
    groups = torch.tensor([0, 0, 1, 1])
    micro = [torch.tensor([0, 2]), torch.tensor([3, 1])]
    assert M.micro_prompt_tokens(prompt_ids[micro[0]], prompt_mask[micro[0]], groups[micro[0]]) == 5
    assert sum(M.micro_prompt_tokens(prompt_ids[m], prompt_mask[m], groups[m]) for m in micro) == 10
    assert M.micro_prompt_tokens(prompt_ids[:2], prompt_mask[:2], groups[:2]) == 3  # one prompt, counted once
    # [7, 8, 9] and [7, 8, 4, 4]: the prefix [7, 8] once, then 1 + 2 tokens
    shared_ids = torch.tensor([[0, 7, 8, 9], [7, 8, 4, 4]])
    shared_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert M.micro_prompt_tokens(shared_ids, shared_mask, torch.tensor([0, 1])) == 5

    flops = PhaseFlops.__new__(PhaseFlops)
    flops.body, flops.head = 100, 10
    out = M.mfu_metrics(flops, 5, 7, {"generation": 1.0, "forward_backward": 2.0}, logprob_passes=0, epochs=1,
                        peak_gflops=1e-6, generation=(15, 21), update_prompt_tokens=10)
    # forward FLOPs 2 * (body * (prompt + scored) + head * scored); x3 with the backward
    assert out["mfu/generation"] == 2 * (100 * 12 + 10 * 7) / 1.0 / 1e3  # the kept batch
    assert out["mfu/generation_sampled"] == 2 * (100 * 36 + 10 * 21) / 1.0 / 1e3  # every round
    assert out["mfu/forward_backward"] == 6 * (100 * 12 + 10 * 7) / 2.0 / 1e3
    assert out["mfu/forward_backward_scheduled"] == 6 * (100 * 17 + 10 * 7) / 2.0 / 1e3
    assert "mfu/logprobs" not in out and out["tokens/generated"] == 21 and out["tokens/update_prompt"] == 10
