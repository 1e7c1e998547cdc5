"""Optimizers: warm-up LR values, Schedule-Free train/eval weights, grad-norm checks."""

from __future__ import annotations

import math

import pytest
import torch

from rpgrl.loop.optim import (LinearWarmup, build_optimizer, clip_and_check, clip_and_step, eval_mode, set_eval_mode,
                              set_train_mode)


def quad_step(p: torch.nn.Parameter, opt, sched=None) -> None:
    opt.zero_grad()
    ((p - torch.tensor([1.0, -2.0], dtype=p.dtype)) ** 2).sum().backward()
    opt.step()
    if sched is not None:
        sched.step()


@pytest.mark.parametrize(
    ("warmup", "expected"),
    [
        (4, [0.025, 0.05, 0.075, 0.1, 0.1, 0.1]),  # k/4 * 0.1 for optimizer steps k = 1..4
        (1, [0.1] * 4),
        (0, [0.1] * 4),
    ],
)
def test_adamw_warmup_lr_values(warmup, expected):
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt, sched = build_optimizer([p], "adamw", lr=0.1, warmup_steps=warmup, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.1
    seen = []
    for _ in expected:
        seen.append(opt.param_groups[0]["lr"])
        quad_step(p, opt, sched)
    assert seen == pytest.approx(expected, abs=1e-15)


def test_first_adamw_step_moves_by_warmup_lr():
    # Adam's first step is lr * sign(grad) (m/sqrt(v) = g/|g|, eps negligible); no decay.
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt, sched = build_optimizer([p], "adamw", lr=0.1, warmup_steps=4, eps=1e-12)
    quad_step(p, opt, sched)
    assert p.detach().tolist() == pytest.approx([0.025, -0.025], abs=1e-12)


def test_scheduler_state_is_plain_data():
    p = torch.nn.Parameter(torch.zeros(2))
    _, sched = build_optimizer([p], "adamw", lr=0.1, warmup_steps=3)
    assert sched.state_dict()["lr_lambdas"] == [{"warmup_steps": 3}]
    assert LinearWarmup(3)(0) == pytest.approx(1 / 3) and LinearWarmup(3)(5) == 1.0


def test_unknown_optimizer_lists_allowed():
    with pytest.raises(ValueError, match=r"'sgd'.*adamw, schedulefree_adamw"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], "sgd", lr=0.1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(torch.nn.Linear(2, 2).requires_grad_(False), "adamw", lr=0.1)


def test_schedulefree_train_eval_switch():
    beta1 = 0.9
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt, sched = build_optimizer([p], "schedulefree_adamw", lr=0.1, betas=(beta1, 0.999), warmup_steps=2)
    assert sched is None and opt.param_groups[0]["warmup_steps"] == 2
    for _ in range(3):
        quad_step(p, opt)
    y = p.detach().clone()
    z = opt.state[p]["z"].clone()
    set_eval_mode(opt)
    x = p.detach().clone()
    # y = (1 - beta1) z + beta1 x  =>  x = (y - (1 - beta1) z) / beta1
    assert torch.allclose(x, (y - (1 - beta1) * z) / beta1, atol=1e-12)
    assert (x - y).abs().max() > 1e-3
    set_train_mode(opt)
    assert torch.allclose(p.detach(), y, atol=1e-12)
    with eval_mode(opt):
        assert torch.allclose(p.detach(), x, atol=1e-12)
        assert opt.param_groups[0]["train_mode"] is False
    assert opt.param_groups[0]["train_mode"] is True
    quad_step(p, opt)  # stepping works again after the context


def test_mode_switch_is_noop_for_adamw():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt, _ = build_optimizer([p], "adamw", lr=0.1)
    with eval_mode(opt):
        set_eval_mode(opt)
    set_train_mode(opt)
    assert p.detach().tolist() == [1.0, 2.0]


def _with_grads(*grads):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(len(g), dtype=torch.float64))
        p.grad = torch.tensor(g, dtype=torch.float64)
        params.append(p)
    return params


def test_clip_returns_preclip_norm_and_scales():
    params = _with_grads([3.0, 0.0], [4.0])
    norm, ok = clip_and_check(params, max_norm=1.0)
    assert ok and norm == pytest.approx(5.0)
    assert params[0].grad.tolist() == pytest.approx([0.6, 0.0], rel=1e-5)
    assert params[1].grad.tolist() == pytest.approx([0.8], rel=1e-5)
    params = _with_grads([0.3], [0.4])
    assert clip_and_check(params, max_norm=1.0) == (pytest.approx(0.5), True)
    assert params[0].grad.tolist() == [0.3]  # below the limit: untouched


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_nonfinite_norm_detected_and_grads_zeroed(bad):
    params = _with_grads([1.0, bad], [2.0])
    norm, ok = clip_and_check(iter(params), max_norm=1.0)
    assert not ok and not math.isfinite(norm)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)


def test_clip_edge_cases():
    p = torch.nn.Parameter(torch.zeros(2))
    assert clip_and_check([p], 1.0) == (0.0, True)  # no grads yet
    with pytest.raises(ValueError, match="max_norm"):
        clip_and_check([p], 0.0)


@pytest.mark.parametrize("name", ["adamw", "schedulefree_adamw"])
def test_clip_and_step_is_clip_then_step(name):
    """The fused AdamW step takes the clip coefficient as its grad_scale (rpgrl.loop.optim.clip_and_step):
    the same weights, moments and (clipped) gradients as clip_grad_norm_ then step, to float
    round-off, over steps that clip and steps that do not; other optimizers clip as before."""
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(40, 30)), torch.nn.Parameter(torch.randn(30))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    (opt_a, _), (opt_b, _) = build_optimizer(a, name, lr=1e-2), build_optimizer(b, name, lr=1e-2)
    assert (opt_a.defaults.get("fused") is True) == (name == "adamw")
    for scale in (3.0, 0.01, 5.0):  # clipped (norm ~ 100), not clipped, clipped
        grads = [torch.randn_like(p) * scale for p in a]
        for x, y, g in zip(a, b, grads):
            x.grad, y.grad = g.clone(), g.clone()
        norm_a, ok_a = clip_and_step(opt_a, a, max_norm=1.0)
        norm_b, ok_b = clip_and_check(b, max_norm=1.0)
        opt_b.step()
        assert ok_a and ok_b and norm_a == norm_b
        assert not hasattr(opt_a, "grad_scale")  # never left behind for a later step
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=0)
        for sa, sb in zip(opt_a.state.values(), opt_b.state.values()):
            for k in sa:
                torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-9)
    a[0].grad = torch.full_like(a[0], math.nan)
    before = [p.detach().clone() for p in a]
    norm, ok = clip_and_step(opt_a, a, max_norm=1.0)
    assert not ok and math.isnan(norm)
    assert all(torch.equal(p, q) for p, q in zip(a, before))  # skipped: weights unchanged
    assert all(not p.grad.any() for p in a)  # and the grads zeroed, as clip_and_check does


def test_eval_mode_blocks_nest_for_schedule_free():
    """An evaluation inside a gathered-weights block must still see the averaged weights."""
    from rpgrl.loop.optim import eval_mode

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt, _ = build_optimizer(model, "schedulefree_adamw", lr=0.1)
    for _ in range(3):  # after a few steps the averaged x and the train iterate y differ
        opt.zero_grad()
        model(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
    y = model.weight.detach().clone()
    with eval_mode(opt):
        x = model.weight.detach().clone()
        with eval_mode(opt):
            assert torch.equal(model.weight, x)
        assert torch.equal(model.weight, x)  # the inner block did not switch back to train
    assert torch.equal(model.weight, y) and not torch.equal(x, y)
