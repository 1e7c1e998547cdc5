"""Property tests (hypothesis) for ``policy_loss``: finiteness, masking, Prop. 4.1."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rpgrl.losses import AGG_MODES, DIVERGENCES, LOSSES, policy_loss

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True)


@st.composite
def batches(draw, lo=-1e4, hi=50.0, adv_max=1e3):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 8))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    vals = st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=32)

    def tensor(elements, shape):
        n = 1
        for s in shape:
            n *= s
        return torch.tensor(draw(st.lists(elements, min_size=n, max_size=n)), dtype=dtype).reshape(shape)

    logp, old, anc = (tensor(vals, (B, T)) for _ in range(3))
    adv_shape = draw(st.sampled_from([(B,), (B, T)]))
    adv = tensor(st.floats(-adv_max, adv_max, allow_nan=False, width=32), adv_shape)
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))).reshape(B, T)
    return logp, old, anc, adv, mask


@SETTINGS
@given(
    batch=batches(),
    name=st.sampled_from(list(LOSSES)),
    agg=st.sampled_from(AGG_MODES),
    use_anchor=st.booleans(),
    clipped=st.booleans(),
    beta=st.sampled_from([0.0, 1e-4, 0.5]),
)
def test_loss_and_grad_finite_and_masked_grad_exactly_zero(batch, name, agg, use_anchor, clipped, beta):
    logp, old, anc, adv, mask = batch
    logp = logp.requires_grad_(True)
    loss, metrics = policy_loss(
        name, logp, old, adv, mask, anc if use_anchor else None, beta=beta,
        clip=(0.2, 0.28) if clipped else None, dual_clip=10.0 if clipped else None, agg=agg,
    )
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all()
    assert (grad[~mask] == 0).all()
    assert all(bool(torch.isfinite(torch.as_tensor(v))) for v in metrics.values())


@SETTINGS
@given(batch=batches(), name=st.sampled_from(list(LOSSES)), garbage=st.floats(-1e4, 1e4))
def test_masked_values_do_not_change_loss_or_grad(batch, name, garbage):
    logp, old, anc, adv, mask = batch
    grads, losses = [], []
    for fill in (None, garbage):
        tensors = [t.clone() for t in (logp, old, anc)]
        a = adv.clone()
        if fill is not None:
            for t in tensors:
                t[~mask] = fill
            if a.dim() == 2:
                a[~mask] = fill
        lp = tensors[0].requires_grad_(True)
        loss, _ = policy_loss(name, lp, tensors[1], a, mask, tensors[2], beta=0.1)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, lp)[0])
    assert torch.equal(losses[0], losses[1])
    assert torch.equal(grads[0], grads[1])


@SETTINGS
@given(batch=batches(lo=-8.0, hi=0.0, adv_max=5.0), div=st.sampled_from(list(DIVERGENCES)),
       use_anchor=st.booleans())
def test_reinforce_and_differentiable_agree_unclipped(batch, div, use_anchor):
    """Prop. 4.1 on arbitrary realistic batches (log-ratios within the clamp range)."""
    logp, old, anc, adv, mask = batch
    logp, old, anc, adv = (t.double() for t in (logp, old, anc, adv))
    grads = []
    for name in (f"rpg_{div}", f"rpg_reinforce_{div}"):
        lp = logp.clone().requires_grad_(True)
        loss, _ = policy_loss(name, lp, old, adv, mask, anc if use_anchor else None, beta=0.3,
                              clip=None, dual_clip=None)
        grads.append(torch.autograd.grad(loss, lp)[0])
    scale = grads[0].abs().max().item() + 1.0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12 * scale)
