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

    over = tiny_overrides("trainer.profile=true", "trainer.total_steps=3", "trainer.save_every=3")
    out = next(o.split("=", 1)[1] for o in over if o.startswith("output_dir="))
    assert main(["train", *over]) == 0
    rows = [json.loads(x) for x in open(f"{out}/metrics.jsonl") if '"mfu/' in x]
    assert len(rows) == 3
    for r in rows:
        assert r["tokens/response"] > 0 and r["tokens/prompt_unique"] > 0
        assert r["mfu/matmul_peak_gflops"] > 0 and r["memory/peak_rss_mb"] > 50
        for phase in ("generation", "forward_backward", "logprobs"):  # 2 mini-batches: pi_old needs a pass
            assert 0 < r[f"mfu/{phase}"] <= 1.0, (phase, r[f"mfu/{phase}"])
    printed = capsys.readouterr().out
    assert "model FLOP utilisation" in printed and "forward_backward" in printed and "peak RSS" in printed
