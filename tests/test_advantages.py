"""Advantage estimators (docs/math.md §5): hand-computed cases, singletons, masking."""

from __future__ import annotations

import math

import pytest
import torch

from rpgrl.algorithm.advantages import ADVANTAGES, compute_advantages, global_advantages, masked_whiten

DT = torch.float64
# groups (non-contiguous ids): 7 -> [1, 0, 1], 2 -> [0.5, 0.5] (zero std), 5 -> [3] (singleton)
R = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.5, 3.0], dtype=DT)
GID = torch.tensor([7, 7, 7, 2, 2, 5])
LENGTHS = torch.tensor([3, 1, 2, 0, 2, 1])
MASK = torch.arange(3)[None, :] < LENGTHS[:, None]
STD7 = math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2)  # unbiased std of [1, 0, 1]


def _per_seq(adv: torch.Tensor) -> list[float]:
    """The per-sequence value, checking it is constant over valid tokens and 0 elsewhere."""
    assert (adv[~MASK] == 0).all()
    out = []
    for i in range(adv.shape[0]):
        row = adv[i, MASK[i]]
        if row.numel():
            assert torch.all(row == row[0])
        out.append(row[0].item() if row.numel() else None)  # empty row: all padding
    return out


def _close(got, want):
    for g, w in zip(got, want):
        if g is None:
            continue
        assert g == pytest.approx(w, rel=1e-12, abs=1e-15)


def test_rpg_group_mean():
    _close(_per_seq(compute_advantages("rpg", R, GID, MASK)), [1 / 3, -2 / 3, 1 / 3, 0, 0, 3.0])


def test_grpo_group_normalized_with_singleton_and_zero_std():
    eps = 1e-6
    want = [(1 / 3) / (STD7 + eps), (-2 / 3) / (STD7 + eps), (1 / 3) / (STD7 + eps), 0.0, 0.0, 3.0 / (1 + eps)]
    _close(_per_seq(compute_advantages("grpo", R, GID, MASK, eps=eps)), want)


def test_batch_mean():
    _close(_per_seq(compute_advantages("batch_mean", R, GID, MASK)), [0.0, -1.0, 0.0, -0.5, -0.5, 2.0])


def test_rloo_leave_one_out():
    # 1 - mean(0, 1) = 0.5; 0 - mean(1, 1) = -1; 0.5 - 0.5 = 0; singleton keeps its reward
    _close(_per_seq(compute_advantages("rloo", R, GID, MASK)), [0.5, -1.0, 0.5, 0.0, 0.0, 3.0])


def _whiten_by_hand(values):
    n = len(values)
    mean = sum(values) / n
    var = sum((x - mean) ** 2 for x in values) / (n - 1)
    return [(x - mean) / math.sqrt(var + 1e-8) for x in values]


def test_reinforce_pp_baseline_whitens_group_centred_rewards_over_tokens():
    adv = compute_advantages("reinforce_pp_baseline", R, GID, MASK)
    per_seq = [1 / 3, -2 / 3, 1 / 3, 0.0, 0.0, 3.0]
    tokens = [per_seq[i] for i in range(6) for _ in range(int(LENGTHS[i]))]
    want = _whiten_by_hand(tokens)
    torch.testing.assert_close(adv[MASK], torch.tensor(want, dtype=DT), rtol=1e-12, atol=1e-14)
    assert (adv[~MASK] == 0).all()


def test_reinforce_pp_token_returns_with_kl_in_reward():
    rewards = torch.tensor([1.0, 0.0], dtype=DT)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [1.0, 1.0, 99.0]], dtype=DT)
    adv = compute_advantages("reinforce_pp", rewards, torch.tensor([0, 1]), mask, token_kl=kl, kl_coef=0.1)
    # r = [-0.01, -0.02, 1 - 0.03], [-0.1, -0.1]; returns (gamma = 1): [0.94, 0.95, 0.97], [-0.2, -0.1]
    want = _whiten_by_hand([0.94, 0.95, 0.97, -0.2, -0.1])
    torch.testing.assert_close(adv[mask], torch.tensor(want, dtype=DT), rtol=1e-12, atol=1e-14)
    assert adv[1, 2] == 0


def test_reinforce_pp_without_kl_is_whitened_outcome():
    adv = compute_advantages("reinforce_pp", R, GID, MASK)
    tokens = [R[i].item() for i in range(6) for _ in range(int(LENGTHS[i]))]
    torch.testing.assert_close(adv[MASK], torch.tensor(_whiten_by_hand(tokens), dtype=DT))


def test_outcome_estimators_fold_kl_at_sequence_level():
    kl = torch.rand(6, 3, dtype=DT)
    kl_sum = (kl * MASK).sum(1)
    got = compute_advantages("rpg", R, GID, MASK, token_kl=kl, kl_coef=0.5)
    want = compute_advantages("rpg", R - 0.5 * kl_sum, GID, MASK)
    torch.testing.assert_close(got, want)
    # kl_coef = 0 ignores token_kl
    torch.testing.assert_close(compute_advantages("rpg", R, GID, MASK, token_kl=kl),
                               compute_advantages("rpg", R, GID, MASK))


def _loop_reference(name, rewards, gids, eps=1e-6):
    """verl-style per-group Python loop."""
    out = torch.empty_like(rewards)
    for g in gids.unique():
        idx = (gids == g).nonzero().flatten()
        r = rewards[idx]
        if len(idx) == 1:
            out[idx] = r / (1 + eps) if name == "grpo" else r
        elif name == "grpo":
            out[idx] = (r - r.mean()) / (r.std() + eps)
        elif name == "rpg":
            out[idx] = r - r.mean()
        else:  # rloo
            out[idx] = r - (r.sum() - r) / (len(idx) - 1)
    return out


@pytest.mark.parametrize("name", ["grpo", "rpg", "rloo"])
def test_vectorized_groups_match_loop_reference(name):
    g = torch.Generator().manual_seed(0)
    gids = torch.randint(0, 9, (40,), generator=g)
    rewards = torch.randint(0, 2, (40,), generator=g).to(DT) + 0.1 * torch.rand(40, generator=g, dtype=DT)
    mask = torch.ones(40, 2, dtype=torch.bool)
    got = compute_advantages(name, rewards, gids, mask)[:, 0]
    torch.testing.assert_close(got, _loop_reference(name, rewards, gids), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ADVANTAGES)
def test_all_estimators_zero_on_padding_and_finite(name):
    adv = compute_advantages(name, R, GID, MASK.to(DT), token_kl=torch.rand(6, 3, dtype=DT), kl_coef=0.1)
    assert adv.shape == MASK.shape and adv.dtype == DT
    assert (adv[~MASK] == 0).all() and torch.isfinite(adv).all()


def test_masked_whiten_single_valid_token_is_finite():
    out = masked_whiten(torch.tensor([[5.0, 7.0]]), torch.tensor([[True, False]]))
    assert out.tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="gae"), "unknown advantage estimator 'gae'"),
        (dict(group_ids=torch.tensor([0.0, 1.0])), "group_ids must be an integer"),
        (dict(group_ids=torch.tensor([0, 1, 2])), "group_ids must be an integer"),
        (dict(mask=torch.ones(3, 4)), "mask must be"),
        (dict(token_kl=torch.zeros(2, 5)), "token_kl shape"),
        (dict(rewards=torch.tensor([1, 0])), "rewards must be a float"),
        (dict(eps=0.0), "eps must be > 0"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = dict(name="grpo", rewards=torch.tensor([1.0, 0.0]), group_ids=torch.tensor([0, 0]),
                mask=torch.ones(2, 4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        compute_advantages(args.pop("name"), args.pop("rewards"), args.pop("group_ids"),
                           args.pop("mask"), **args)


@pytest.mark.parametrize("name", ["batch_mean", "reinforce_pp", "reinforce_pp_baseline", "grpo"])
def test_global_advantages_equal_the_full_batch(name):
    """Two shards of different response widths and overlapping local group ids, gathered,
    give the rows of the full-batch estimator (float64, exact up to rounding)."""
    from dataclasses import dataclass

    from rpgrl.parallel.distributed import DistContext

    gen = torch.Generator().manual_seed(3)
    rewards = torch.rand(12, generator=gen, dtype=torch.float64)
    group_ids = torch.arange(12) // 4  # 3 groups of 4: rank 0 holds groups 0-1, rank 1 group 2
    lengths = torch.tensor([5, 3, 1, 4, 2, 5, 5, 1, 3, 2, 2, 1])  # rank 1's rows are <= 3 wide
    mask = (torch.arange(5)[None, :] < lengths[:, None]).double()
    token_kl = torch.rand(12, 5, generator=gen, dtype=torch.float64) * mask
    full = compute_advantages(name, rewards, group_ids, mask, token_kl=token_kl, kl_coef=0.1)
    shards = [(slice(0, 8), 5), (slice(8, 12), 3)]  # rank 1: 1 group, width 3
    parts = [(rewards[s], group_ids[s] - group_ids[s].min(), mask[s, :w], token_kl[s, :w]) for s, w in shards]

    @dataclass(frozen=True)
    class TwoRanks(DistContext):
        def all_gather_object(self, obj):
            return parts

    for rank, (rows, w) in enumerate(shards):
        got = global_advantages(TwoRanks(rank=rank, world_size=2), name, *parts[rank][:3],
                                token_kl=parts[rank][3], kl_coef=0.1)
        torch.testing.assert_close(got, full[rows, :w], atol=1e-12, rtol=0)
        assert full[rows, w:].abs().sum() == 0
