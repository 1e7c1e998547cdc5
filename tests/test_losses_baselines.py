"""Dr. GRPO, GSPO and CISPO against verl 0.9.1's registered implementations.

Values and gradients of ``rpgrl.losses.policy_loss`` must equal verl's
``core_algos.compute_policy_loss_{gspo,cispo,vanilla}`` (called with verl's own ActorConfig
and global batch counts) to 1e-10 in float64; Dr. GRPO's advantage must equal verl's GRPO
estimator with ``norm_adv_by_std_in_grpo=False``. Each test fails if the rpgrl loss is
changed to a plausible neighbour (token-level instead of sequence ratio, no stop-gradient,
std-normalized advantages): the cases exercise clipped and unclipped tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

verl = pytest.importorskip("verl", exc_type=ImportError)

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402

from rpgrl.algorithm.advantages import compute_advantages  # noqa: E402
from rpgrl.config import load_config  # noqa: E402
from rpgrl.integrations.verl import verl_normalization  # noqa: E402
from rpgrl.losses import LOSSES, policy_loss  # noqa: E402

DT = torch.float64
CONFIG_DIR = str(Path(verl.__file__).parent / "trainer" / "config")
LENS = (7, 4, 1, 6, 3, 7, 5, 2)
T = 7
INFO = dict(dp_size=2, batch_num_tokens=70, global_batch_size=16)


def _actor_config(clip_low: float, clip_high: float, clip_c: float = 3.0):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=[
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "actor_rollout_ref.rollout.n=4",
            f"actor_rollout_ref.actor.clip_ratio_low={clip_low}",
            f"actor_rollout_ref.actor.clip_ratio_high={clip_high}",
            f"actor_rollout_ref.actor.clip_ratio_c={clip_c}",
        ])
    node = OmegaConf.create(OmegaConf.to_container(cfg.actor_rollout_ref.actor, resolve=True))
    config = omega_conf_to_dataclass(node)
    config.global_batch_info.update(INFO)
    return config


def _tensors(seed: int, spread: float):
    g = torch.Generator().manual_seed(seed)
    B = len(LENS)
    mask = torch.arange(T)[None, :] < torch.tensor(LENS)[:, None]
    logp = -torch.nn.functional.softplus(torch.randn(B, T, generator=g, dtype=DT)) - 0.05
    old = logp + spread * torch.randn(B, T, generator=g, dtype=DT)
    adv = torch.randn(B, generator=g, dtype=DT)[:, None].expand(B, T)
    zero = torch.zeros((), dtype=DT)
    return logp, torch.where(mask, old, zero), torch.where(mask, adv, zero), mask


def _value_and_grad(fn, logp):
    lp = logp.clone().requires_grad_(True)
    loss = fn(lp)[0]
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad


def _compare(name, verl_fn, config, agg, logp, old, adv, mask, clip, dual_clip):
    rp_agg, norm = verl_normalization(mask, agg, config.global_batch_info)
    got = _value_and_grad(lambda lp: policy_loss(name, lp, old, adv, mask, beta=0.0, clip=clip,
                                                 dual_clip=dual_clip, agg=rp_agg, norm=norm), logp)
    want = _value_and_grad(lambda lp: verl_fn(old, lp, adv, mask.long(), agg, config), logp)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-10)
    assert want[1].abs().max() > 1e-3
    return got


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum"])
def test_gspo_matches_verl(agg):
    """GSPO: sequence-level ratio s_i = exp(mean_t log w), PPO clip on s_i (verl: compute_policy_loss_gspo)."""
    clip = (0.03, 0.04)
    config = _actor_config(*clip)
    logp, old, adv, mask = _tensors(0, 0.3)
    _compare("gspo", core_algos.compute_policy_loss_gspo, config, agg, logp, old, adv, mask, clip, None)
    # both sides of the clip are exercised: some sequences clipped, some not
    log_s = torch.where(mask, logp - old, 0.0).sum(-1) / mask.sum(-1)
    s = log_s.exp()
    a = adv[:, 0]
    clipped = ((a >= 0) & (s >= 1 + clip[1])) | ((a < 0) & (s <= 1 - clip[0]))
    assert 0 < int(clipped.sum()) < len(LENS)
    # and it is not the token-level PPO loss
    ppo = _value_and_grad(lambda lp: policy_loss("ppo", lp, old, adv, mask, beta=0.0, clip=clip, dual_clip=None,
                                                 agg="seq-mean-token-mean"), logp)
    gspo = _value_and_grad(lambda lp: policy_loss("gspo", lp, old, adv, mask, beta=0.0, clip=clip, dual_clip=None,
                                                  agg="seq-mean-token-mean"), logp)
    assert (ppo[1] - gspo[1]).abs().max() > 1e-3


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_cispo_matches_verl(agg):
    """CISPO: -SG(clip(w)) * A * log pi (verl: compute_policy_loss_cispo); clipped tokens keep a gradient."""
    clip = (0.2, 0.28)
    config = _actor_config(*clip)
    logp, old, adv, mask = _tensors(1, 0.5)
    _, grad = _compare("cispo", core_algos.compute_policy_loss_cispo, config, agg, logp, old, adv, mask, clip, None)
    w = (logp - old).exp()
    outside = mask & ((w > 1 + clip[1]) | (w < 1 - clip[0]))
    assert outside.any() and (grad[outside] != 0).all()  # all tokens keep a gradient
    _, m = policy_loss("cispo", logp, old, adv, mask, beta=0.0, clip=clip, dual_clip=None)
    assert float(m["grad_stopped_frac"]) == 0.0
    assert float(m["clipfrac_upper"] + m["clipfrac_lower"]) == pytest.approx(float(outside.sum() / mask.sum()))


def test_dr_grpo_loss_matches_verl_vanilla_with_seq_mean_token_sum_norm():
    """Dr. GRPO in verl = vanilla PPO loss + loss_agg_mode seq-mean-token-sum-norm (constant
    denominator: sequences x horizon); rpgrl: the ppo loss, seq-mean-token-sum, that norm."""
    clip, c = (0.2, 0.2), 3.0
    config = _actor_config(*clip, clip_c=c)
    logp, old, adv, mask = _tensors(2, 0.5)
    agg, norm = verl_normalization(mask, "seq-mean-token-sum-norm", config.global_batch_info)
    assert (agg, norm) == ("seq-mean-token-sum", 16 / 2 * T)
    _compare("ppo", core_algos.compute_policy_loss_vanilla, config, "seq-mean-token-sum-norm",
             logp, old, adv, mask, clip, c)


def test_dr_grpo_advantage_matches_verl_without_std():
    g = torch.Generator().manual_seed(3)
    rewards = torch.rand(9, generator=g, dtype=DT)
    index = np.array(["a", "a", "a", "b", "b", "c", "d", "d", "d"], dtype=object)  # "c" is a singleton
    group_ids = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3])
    mask = torch.arange(5)[None] < torch.tensor([5, 3, 1, 4, 5, 2, 5, 1, 3])[:, None]
    token_rewards = torch.zeros(9, 5, dtype=DT)
    token_rewards[torch.arange(9), mask.sum(-1) - 1] = rewards
    want, _ = core_algos.compute_grpo_outcome_advantage(token_rewards, mask.to(DT), index,
                                                        norm_adv_by_std_in_grpo=False)
    got = compute_advantages("rpg", rewards, group_ids, mask)
    torch.testing.assert_close(got, want.to(DT), rtol=0, atol=1e-10)
    std_normed = compute_advantages("grpo", rewards, group_ids, mask)
    assert (std_normed - want).abs().max() > 1e-2


def test_presets_are_the_papers_settings():
    dr = load_config(overrides=["algorithm.preset=dr_grpo"]).algorithm
    assert (dr.loss, dr.advantage, dr.beta, dr.agg, dr.clip_c) == ("ppo", "rpg", 0.0, "seq-mean-token-sum", None)
    gs = load_config(overrides=["algorithm.preset=gspo"]).algorithm
    assert (gs.loss, gs.clip_low, gs.clip_high, gs.agg, gs.beta) == ("gspo", 3e-4, 4e-4, "seq-mean-token-mean", 0.0)
    ci = load_config(overrides=["algorithm.preset=cispo"]).algorithm
    assert (ci.loss, ci.clip_high, ci.agg, ci.beta) == ("cispo", 4.0, "token-mean", 0.0)
    assert not LOSSES["gspo"].uses_dual_clip and not LOSSES["cispo"].uses_beta


@pytest.mark.medium
def test_baseline_presets_run_in_compare(tiny_overrides, tmp_path):
    from rpgrl.tools.compare import compare

    out = compare(["dr_grpo", "gspo", "cispo"], 1, None, tiny_overrides("eval.before_training=false"),
                  tmp_path / "cmp", log=lambda *a, **k: None)
    for algo in ("dr_grpo", "gspo", "cispo"):
        (run,) = out["results"][algo]
        assert run["steps"] == 2 and run["algorithm"] == algo
    assert "| gspo | 1 |" in Path(out["markdown"]).read_text()
