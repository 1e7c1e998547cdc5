"""rpgrl.flops: the parameter counts and token arithmetic behind model FLOP utilisation."""

from __future__ import annotations

import pytest

from hf_tiny import tiny_causal_lm
from rpgrl.flops import PhaseFlops, matmul_params, matmul_peak_gflops


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
