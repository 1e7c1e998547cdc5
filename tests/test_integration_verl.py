"""rpgrl losses inside verl 0.9 (rpgrl.integrations.verl): registration, config, exactness.

Every loss is fetched through verl's ``get_policy_loss_fn`` and run through verl's own
``verl.workers.utils.losses.ppo_loss`` (the function verl 0.9.1's actor worker calls) with an
``ActorConfig`` built from verl's hydra yaml + overrides. Its value and gradient must equal
``rpgrl.losses.policy_loss`` on the same tensors with verl's global-batch normalization, and
``rpgrl_ppo`` must equal verl's own ``vanilla`` loss in every ``loss_agg_mode`` (an
independent check of that normalization). Float64 throughout; single process (ppo_loss
needs no process group: dp_size and the global counts arrive in the batch).
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

verl = pytest.importorskip(
    "verl", reason="verl is not installed (pip install -e '.[verl]'); the verl plugin is untested"
)
if not verl.__version__.startswith("0.9."):
    pytest.skip(f"the rpgrl verl plugin targets verl 0.9.x, found {verl.__version__}", allow_module_level=True)

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402
from verl.workers.config import PolicyLossConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

import rpgrl.integrations.verl as rv  # noqa: E402
from rpgrl.losses import LOSSES, policy_loss  # noqa: E402

DT = torch.float64
REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(Path(verl.__file__).parent / "trainer" / "config")
TARGET = "rpgrl.integrations.verl.RPGPolicyLossConfig"
BETA = 0.05  # large, so that a dropped or mis-scaled KL term cannot hide below tolerance
CLIP, DUAL = (0.2, 0.28), 10.0

# The micro-batch is one of several: verl's ppo_loss reads the whole mini-batch's counts.
DP_SIZE, BATCH_NUM_TOKENS, GLOBAL_BATCH_SIZE = 2, 50, 12
P, T, LENS = 3, 7, (7, 4, 1, 6, 3)
SEQ_ADV = (0.8, -0.6, 0.3, -1.2, 0.5)
# (rpgrl agg, norm) that verl's agg_loss amounts to, by hand from its formulas
# (local sum / global count * dp_size): norm = global count / dp_size.
EXPECTED_NORM = {
    "token-mean": ("token-mean", 50 / 2),
    "token-sum": ("token-mean", 1 / 2),
    "seq-mean-token-sum": ("seq-mean-token-sum", 12 / 2),
    "seq-mean-token-mean": ("seq-mean-token-mean", 12 / 2),
    "seq-mean-token-sum-norm": ("seq-mean-token-sum", 12 / 2 * T),  # loss_scale_factor None -> T
}


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


@pytest.fixture(scope="module")
def actor_yaml():
    """actor_rollout_ref.actor of verl's ppo_trainer.yaml with the paper's RPG overrides."""
    cfg = _compose(
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.n=4",
        f"actor_rollout_ref.actor.clip_ratio_low={CLIP[0]}",
        f"actor_rollout_ref.actor.clip_ratio_high={CLIP[1]}",
        f"actor_rollout_ref.actor.clip_ratio_c={DUAL}",
        f"actor_rollout_ref.actor.policy_loss._target_={TARGET}",
        "actor_rollout_ref.actor.policy_loss.loss_mode=rpg_reinforce_ufkl",
        f"+actor_rollout_ref.actor.policy_loss.beta={BETA}",
    )
    return cfg.actor_rollout_ref.actor


def _actor_config(actor_yaml, **updates):
    """ActorConfig as verl's worker builds it (omega_conf_to_dataclass), dotted key updates."""
    node = OmegaConf.create(OmegaConf.to_container(actor_yaml, resolve=True))
    for key, value in updates.items():
        OmegaConf.update(node, key.replace("__", "."), value, force_add=True)
    return omega_conf_to_dataclass(node)


def _tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B = len(LENS)
    mask = torch.arange(T)[None, :] < torch.tensor(LENS)[:, None]
    logp = -torch.nn.functional.softplus(torch.randn(B, T, generator=g, dtype=DT)) - 0.05
    old = logp + 0.5 * torch.randn(B, T, generator=g, dtype=DT)
    old[1, 0] = logp[1, 0] - 2.6  # A < 0 and w = e^2.6 > c = 10: the dual clip binds
    adv = torch.tensor(SEQ_ADV, dtype=DT)[:, None].expand(B, T)
    zero = torch.zeros((), dtype=DT)
    return logp, torch.where(mask, old, zero), torch.where(mask, adv, zero), mask


def _verl_call(config, logp, old, adv, mask, rollout_is_weights=None, **batch_info):
    """ppo_loss on a padded verl batch whose model output holds logp (gradient flows back);
    ``rollout_is_weights`` ([B, T]) is put in the batch as verl's rollout correction does."""
    B = logp.shape[0]
    lens = mask.sum(-1).tolist()
    # model log-probs over prompt+response tokens; ppo_loss reads the response slice shifted by one
    pieces = []
    for i, n in enumerate(lens):
        pieces += [torch.zeros(P - 1, dtype=logp.dtype), logp[i, :n], torch.zeros(1, dtype=logp.dtype)]
    data = TensorDict(
        {
            "prompts": torch.ones(B, P, dtype=torch.long),
            "responses": torch.ones(B, T, dtype=torch.long),
            "attention_mask": torch.cat([torch.ones(B, P, dtype=torch.long), mask.long()], dim=1),
            "response_mask": mask.long(),
            "old_log_probs": old,
            "advantages": adv,
        },
        batch_size=[B],
    )
    if rollout_is_weights is not None:
        data["rollout_is_weights"] = rollout_is_weights
    info = dict(dp_size=DP_SIZE, batch_num_tokens=BATCH_NUM_TOKENS, global_batch_size=GLOBAL_BATCH_SIZE)
    info.update(batch_info)
    tu.assign_non_tensor(data, **info)
    loss, metrics = ppo_loss(config, {"log_probs": torch.cat(pieces)}, data)
    return loss, {k: getattr(v, "aggregate", lambda v=v: v)() for k, v in metrics.items()}


def _loss_and_grad(fn, logp):
    leaf = logp.detach().clone().requires_grad_(True)
    loss, metrics = fn(leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad, metrics


def test_every_rpgrl_loss_is_registered_under_its_verl_name():
    assert rv.register() == list(rv.VERL_LOSS_NAMES)  # idempotent: a second call is harmless
    assert sorted(rv.VERL_LOSS_NAMES.values()) == sorted(LOSSES)
    assert set(rv.VERL_LOSS_NAMES) >= {"rpg_reinforce_ufkl", "rpg_urkl", "rpgrl_ppo", "rpgrl_grpo"}
    for verl_name in rv.VERL_LOSS_NAMES:
        assert core_algos.get_policy_loss_fn(verl_name).__module__ == "rpgrl.integrations.verl"
    assert core_algos.get_adv_estimator_fn("rpg") is rv.rpg_outcome_advantage
    assert core_algos.get_policy_loss_fn("vanilla") is core_algos.compute_policy_loss_vanilla


@pytest.mark.parametrize("agg_mode", list(EXPECTED_NORM))
@pytest.mark.parametrize("verl_name", list(rv.VERL_LOSS_NAMES))
def test_verl_ppo_loss_equals_rpgrl_policy_loss(actor_yaml, verl_name, agg_mode):
    config = _actor_config(
        actor_yaml, policy_loss__loss_mode=verl_name, loss_agg_mode=agg_mode
    )
    assert isinstance(config.policy_loss, rv.RPGPolicyLossConfig) and config.policy_loss.beta == BETA
    logp, old, adv, mask = _tensors()
    got, got_grad, metrics = _loss_and_grad(lambda lp: _verl_call(config, lp, old, adv, mask), logp)

    agg, norm = EXPECTED_NORM[agg_mode]
    want, want_grad, _ = _loss_and_grad(
        lambda lp: policy_loss(
            rv.VERL_LOSS_NAMES[verl_name], lp, old, adv, mask,
            beta=BETA, clip=CLIP, dual_clip=DUAL, agg=agg, norm=norm,
        ),
        logp,
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-15)
    assert got_grad[~mask].abs().max() == 0 and (got_grad[mask] != 0).sum() > mask.sum() / 2
    assert metrics["actor/pg_loss"] == pytest.approx(float(want), rel=1e-12)
    assert "actor/rpg/kl_rollout_k3" in metrics


@pytest.mark.parametrize("agg_mode", list(EXPECTED_NORM))
def test_rpgrl_ppo_equals_verl_vanilla_in_every_agg_mode(actor_yaml, agg_mode):
    """verl's own loss + agg_loss is the independent reference for the normalization."""
    logp, old, adv, mask = _tensors(seed=1)
    out = {}
    with pytest.warns(UserWarning, match="not an rpgrl loss"):  # _target_ without loss_mode
        vanilla = _actor_config(actor_yaml, policy_loss__loss_mode="vanilla", loss_agg_mode=agg_mode)
    for mode in ("vanilla", "rpgrl_ppo"):
        config = vanilla if mode == "vanilla" else _actor_config(
            actor_yaml, policy_loss__loss_mode=mode, loss_agg_mode=agg_mode
        )
        out[mode] = _loss_and_grad(lambda lp: _verl_call(config, lp, old, adv, mask), logp)
    (v_loss, v_grad, v_m), (r_loss, r_grad, r_m) = out["vanilla"], out["rpgrl_ppo"]
    # verl's seq-mean-token-mean divides by (length + 1e-8): 1e-9 relative at most here.
    torch.testing.assert_close(r_loss, v_loss, rtol=1e-8, atol=0)
    torch.testing.assert_close(r_grad, v_grad, rtol=1e-8, atol=1e-15)
    for key in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"):
        # verl computes its clip fractions in float32
        assert r_m[key] == pytest.approx(v_m[key], rel=1e-6, abs=1e-12), key
    # the data exercise all three clips (else this comparison would prove little)
    assert r_m["actor/rpg/clipfrac_upper"] > 0 and r_m["actor/rpg/clipfrac_lower"] > 0
    assert r_m["actor/pg_clipfrac_lower"] == pytest.approx(1 / sum(LENS))  # the one dual-clipped token


def test_normalization_with_missing_global_counts_uses_own_counts():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    assert rv.verl_normalization(mask, "token-mean", {}) == ("token-mean", None)
    assert rv.verl_normalization(mask, "seq-mean-token-sum-norm", {"dp_size": 1}) == (
        "seq-mean-token-sum", 2 * 3,  # 2 non-empty sequences x horizon 3
    )
    assert rv.verl_normalization(mask, "seq-mean-token-sum-norm", {"loss_scale_factor": 10}) == (
        "seq-mean-token-sum", 20.0,
    )
    with pytest.raises(ValueError, match="batch_num_tokens"):
        rv.verl_normalization(mask, "token-mean", {"dp_size": 4})
    with pytest.raises(ValueError, match="token-mean"):
        rv.verl_normalization(mask, "sum", {})


def test_plain_policy_loss_config_gets_paper_defaults(actor_yaml):
    """Without the _target_ override verl builds PolicyLossConfig: beta = 1e-4, rollout anchor."""
    node = OmegaConf.to_container(actor_yaml, resolve=True)
    node["policy_loss"].pop("beta")
    node["policy_loss"].update(_target_="verl.workers.config.PolicyLossConfig", loss_mode="rpg_ufkl")
    config = omega_conf_to_dataclass(OmegaConf.create(node))
    assert type(config.policy_loss) is PolicyLossConfig
    logp, old, adv, mask = _tensors(seed=2)
    got, _, _ = _loss_and_grad(lambda lp: _verl_call(config, lp, old, adv, mask), logp)
    want, _ = policy_loss("rpg_ufkl", logp, old, adv, mask, beta=1e-4, clip=CLIP, dual_clip=DUAL, norm=25.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_config_from_hydra_overrides_and_its_errors():
    base = (
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        f"actor_rollout_ref.actor.policy_loss._target_={TARGET}",
        "actor_rollout_ref.actor.policy_loss.loss_mode=rpg_urkl",
    )
    cfg = _compose(*base, "+actor_rollout_ref.actor.policy_loss.beta=0.001",
                   "+actor_rollout_ref.actor.policy_loss.kl_in_advantage=true")
    pl = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor).policy_loss
    assert (type(pl), pl.loss_mode, pl.beta, pl.anchor, pl.kl_in_advantage) == (
        rv.RPGPolicyLossConfig, "rpg_urkl", 0.001, "rollout", True,
    )
    with pytest.raises(Exception, match=r"anchor='ref': expected one of \('rollout', 'periodic', 'adaptive', 'fixed'\)"):
        omega_conf_to_dataclass(_compose(*base, "+actor_rollout_ref.actor.policy_loss.anchor=ref").actor_rollout_ref.actor)
    cfg = _compose(*base, "+actor_rollout_ref.actor.policy_loss.anchor=adaptive",
                   "+actor_rollout_ref.actor.policy_loss.anchor_kappa=0.2",
                   "+actor_rollout_ref.actor.policy_loss.anchor_period=7")
    pl = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor).policy_loss
    assert (pl.anchor, pl.anchor_period, pl.anchor_kappa, pl.anchor_ema) == ("adaptive", 7, 0.2, 0.9)
    for key, value, message in (("anchor_period", 0, "anchor_period must be an integer >= 1"),
                                ("anchor_kappa", 0, "anchor_kappa must be a number > 0"),
                                ("anchor_ema", 1.0, r"anchor_ema must be in \[0, 1\)")):
        with pytest.raises(Exception, match=message):
            omega_conf_to_dataclass(_compose(*base, f"+actor_rollout_ref.actor.policy_loss.{key}={value}").actor_rollout_ref.actor)
    with pytest.raises(Exception, match="beta must be a number >= 0"):
        omega_conf_to_dataclass(_compose(*base, "+actor_rollout_ref.actor.policy_loss.beta=-1").actor_rollout_ref.actor)
    with pytest.raises(ValueError, match="kl_in_advantage=True needs loss_mode"):
        rv.RPGPolicyLossConfig(loss_mode="rpg_reinforce_urkl", kl_in_advantage=True)


def test_kl_in_advantage_reaches_rpgrl(actor_yaml):
    config = _actor_config(actor_yaml, policy_loss__loss_mode="rpg_urkl", policy_loss__kl_in_advantage=True)
    logp, old, adv, mask = _tensors(seed=3)
    got, got_grad, _ = _loss_and_grad(lambda lp: _verl_call(config, lp, old, adv, mask), logp)
    kw = dict(beta=BETA, clip=CLIP, dual_clip=DUAL, norm=25.0)
    want, want_grad, _ = _loss_and_grad(
        lambda lp: policy_loss("rpg_urkl", lp, old, adv, mask, kl_in_advantage=True, **kw), logp
    )
    plain, _ = policy_loss("rpg_urkl", logp, old, adv, mask, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-15)
    assert not torch.isclose(got, plain, rtol=1e-9, atol=0)


def test_unsupported_inputs_are_refused_or_flagged(actor_yaml):
    fn = core_algos.get_policy_loss_fn("rpg_reinforce_ufkl")
    logp, old, adv, mask = _tensors()
    config = _actor_config(actor_yaml)
    with pytest.raises(ValueError, match="rollout_is_weights has shape"):
        fn(old, logp, adv, mask, "token-mean", config, rollout_is_weights=torch.ones(len(LENS), 1, dtype=DT))
    with pytest.raises(ValueError, match="needs the actor config"):
        fn(old, logp, adv, mask, "token-mean", None)
    with pytest.warns(UserWarning, match="use_kl_loss=False"):
        fn(old, logp, adv, mask, "token-mean", _actor_config(actor_yaml, use_kl_loss=True))


def test_rpg_advantage_estimator_through_verl_registry():
    """Called with the keyword arguments verl's compute_advantage passes (ray_trainer.py)."""
    uids = np.array(["a", "b", "a", "c", "b", "a", "a", "b"], dtype=object)
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.7, 1.0, 0.0, 1.0, 0.0])
    mask = torch.ones(8, 3)
    mask[2, 1:] = 0
    token_rewards = torch.zeros(8, 3)
    last = mask.sum(-1).long() - 1
    token_rewards[torch.arange(8), last] = rewards  # outcome reward on the last response token
    fn = core_algos.get_adv_estimator_fn("rpg")
    adv, returns = fn(token_level_rewards=token_rewards, response_mask=mask, config=AlgoConfig(), index=uids)
    # group a: mean 0.5; group b: mean 2/3; singleton c: baseline 0 (verl's convention)
    seq = torch.tensor([0.5, 1 / 3, -0.5, 0.7, 1 / 3, -0.5, 0.5, -2 / 3])
    torch.testing.assert_close(adv, seq[:, None] * mask)
    assert returns is adv
    dr_grpo, _ = core_algos.compute_grpo_outcome_advantage(token_rewards, mask, uids, norm_adv_by_std_in_grpo=False)
    torch.testing.assert_close(adv, dr_grpo)


def test_plugin_entry_point_is_declared_in_installed_metadata():
    eps = [ep for ep in importlib.metadata.entry_points(group="verl.plugins") if ep.value.startswith("rpgrl")]
    if not eps:
        pytest.skip(
            "rpgrl is installed without its verl.plugins entry point: add "
            '[project.entry-points."verl.plugins"] rpgrl = "rpgrl.integrations.verl" to pyproject '
            "and reinstall (pip install -e .)"
        )
    assert [(ep.name, ep.value) for ep in eps] == [("rpgrl", "rpgrl.integrations.verl")]


def test_import_verl_alone_registers_everything(tmp_path):
    """verl's __init__ loads the verl.plugins entry points; with rpgrl's (or, if rpgrl is not
    installed with it, the same line in a stand-in dist-info) `import verl` is enough."""
    declared = any(ep.value == "rpgrl.integrations.verl" for ep in importlib.metadata.entry_points(group="verl.plugins"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("VERL_USE_EXTERNAL_PLUGINS", None)
    if not declared:
        info = tmp_path / "rpgrl_verl_probe-0.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rpgrl-verl-probe\nVersion: 0.0\n")
        (info / "entry_points.txt").write_text("[verl.plugins]\nrpgrl = rpgrl.integrations.verl\n")
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    code = textwrap.dedent(
        """
        import sys
        import verl
        assert "rpgrl.integrations.verl" in sys.modules, "plugin not loaded by import verl"
        from verl.trainer.ppo import core_algos
        print(sorted(n for n in core_algos.POLICY_LOSS_REGISTRY if n.startswith("rpg")))
        print(core_algos.get_adv_estimator_fn("rpg").__name__)
        """
    )
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    names, adv = run.stdout.strip().splitlines()[-2:]
    assert eval(names) == sorted(rv.VERL_LOSS_NAMES)
    assert adv == "rpg_outcome_advantage"


@pytest.mark.parametrize(
    "script, loss", [
        ("run_rpg_ufkl.sh", "rpg_ufkl"),
        ("run_rpg_reinforce_ufkl.sh", "rpg_reinforce_ufkl"),
        ("run_rpg_urkl.sh", "rpg_urkl"),
    ],
)
def test_example_scripts_compose_with_verl_config(script, loss):
    """The paper-run scripts' overrides are valid for verl 0.9.1's ppo_trainer config and select
    the rpgrl loss with the paper's settings (the runs themselves need 8 GPUs)."""
    run = subprocess.run(
        ["bash", str(REPO / "examples" / "verl" / script), "trainer.nnodes=2"],
        env=dict(os.environ, PRINT_ONLY="1", DATA_DIR="/data"), capture_output=True, text=True, timeout=30,
    )
    assert run.returncode == 0, run.stderr
    cfg = _compose(*run.stdout.splitlines())
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    pl = actor.policy_loss
    assert (type(pl), pl.loss_mode, pl.beta, pl.anchor) == (rv.RPGPolicyLossConfig, loss, 1e-4, "rollout")
    assert core_algos.get_policy_loss_fn(pl.loss_mode).__module__ == "rpgrl.integrations.verl"
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert (actor.ppo_mini_batch_size, actor.rollout_n, actor.optim.lr, actor.use_kl_loss) == (32, 16, 1e-6, False)
    assert cfg.algorithm.adv_estimator == "rpg" and not cfg.algorithm.use_kl_in_reward
    assert (cfg.data.train_batch_size, cfg.data.max_response_length) == (512, 8192)
    assert cfg.trainer.total_training_steps == 400 and cfg.trainer.nnodes == 2  # extra args win
    assert cfg.data.train_files == "/data/dapo-math-17k-eng.parquet"


def test_example_reward_fn_is_rpgrl_scorer():
    import importlib.util

    spec = importlib.util.spec_from_file_location("rpgrl_verl_reward_fn", REPO / "examples" / "verl" / "reward_fn.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    right = mod.compute_score("amc_23", "so the sum is 27.\nAnswer: 27", "27", {})
    wrong = mod.compute_score("amc_23", "Answer: 26", "27", {})
    assert (right["score"], wrong["score"]) == (1.0, 0.0) and right["acc"] is True


# --- rollout correction: verl's rollout_is_weights / rejection masks reach every rpgrl loss ---

#: algorithm.rollout_correction settings of verl 0.9.1 (decoupled mode): token / sequence TIS,
#: token / sequence IcePop (zeroed weights), and rejection alone or with TIS (modified mask).
ROLLOUT_CORRECTIONS = {
    "token_tis": dict(rollout_is="token", rollout_is_threshold=1.5),
    "seq_tis": dict(rollout_is="sequence", rollout_is_threshold=2.0),
    "token_icepop": dict(rollout_is="token", rollout_is_threshold="0.8_1.25"),
    "seq_tis_batch_norm": dict(rollout_is="sequence", rollout_is_threshold=2.0, rollout_is_batch_normalize=True),
    "token_rs": dict(rollout_is=None, rollout_rs="token_k1", rollout_rs_threshold="0.8_1.25"),
    "seq_is_rs": dict(rollout_is="sequence", rollout_is_threshold=2.0, rollout_rs="seq_mean_k3",
                      rollout_rs_threshold=0.01),
}


def _rollout_correction(old, mask, seed, **settings):
    """verl's own decoupled-mode computation (ray_trainer.py: compute_rollout_correction_and_add_to_batch)
    on rollout log-probs that differ from pi_old: (rollout_is_weights or None, modified response mask)."""
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask

    g = torch.Generator().manual_seed(seed)
    rollout = torch.where(mask, old + 0.3 * torch.randn(old.shape, generator=g, dtype=DT), 0.0)
    proto, new_mask, metrics = compute_rollout_correction_and_rejection_mask(
        old_log_prob=old, rollout_log_prob=rollout, response_mask=mask.long(), **settings
    )
    weights = None if proto is None else proto.batch["rollout_is_weights"]
    return weights, new_mask.bool(), metrics


def test_rollout_corrections_produce_nontrivial_weights_and_masks():
    """The cases below really exercise truncation, zeroed weights and rejection."""
    logp, old, adv, mask = _tensors(seed=4)
    w, m, _ = _rollout_correction(old, mask, 0, **ROLLOUT_CORRECTIONS["token_tis"])
    assert (w[mask] == 1.5).any() and (w[mask] < 1).any() and torch.equal(m, mask)
    w, _, _ = _rollout_correction(old, mask, 0, **ROLLOUT_CORRECTIONS["token_icepop"])
    assert (w[mask] == 0).any() and (w[mask] > 0).any()
    w, _, _ = _rollout_correction(old, mask, 0, **ROLLOUT_CORRECTIONS["seq_tis"])
    assert all(len(set(w[i, : n].tolist())) == 1 for i, n in enumerate(LENS))  # one weight per sequence
    w, m, _ = _rollout_correction(old, mask, 0, **ROLLOUT_CORRECTIONS["token_rs"])
    assert w is None and 0 < (mask & ~m).sum() < mask.sum()  # some tokens rejected, not all
    _, m, _ = _rollout_correction(old, mask, 0, **ROLLOUT_CORRECTIONS["seq_is_rs"])
    assert 0 < (mask & ~m).sum() < mask.sum()


#: The rpgrl losses that are verl's vanilla (dual-clip PPO) loss at beta = 0: rpgrl's ppo and
#: the differentiable RPG surrogates (docs/math.md §3: pg_t is the dual-clip PPO term, beta * S_t vanishes).
VANILLA_AT_BETA0 = ("rpgrl_ppo", "rpg_fkl", "rpg_rkl", "rpg_ufkl", "rpg_urkl")


@pytest.mark.parametrize("agg_mode", list(EXPECTED_NORM))
@pytest.mark.parametrize("correction", list(ROLLOUT_CORRECTIONS))
@pytest.mark.parametrize("verl_name", VANILLA_AT_BETA0)
def test_rollout_correction_equals_verl_vanilla_at_beta0(actor_yaml, verl_name, correction, agg_mode):
    """Same weights, same (rejection-)mask: value and gradient equal verl's own vanilla loss."""
    logp, old, adv, _ = _tensors(seed=5)
    mask = torch.arange(T)[None, :] < torch.tensor(LENS)[:, None]
    weights, rs_mask, _ = _rollout_correction(old, mask, 1, **ROLLOUT_CORRECTIONS[correction])
    out = {}
    with pytest.warns(UserWarning, match="not an rpgrl loss"):
        vanilla = _actor_config(actor_yaml, policy_loss__loss_mode="vanilla", loss_agg_mode=agg_mode)
    for mode in ("vanilla", verl_name):
        config = vanilla if mode == "vanilla" else _actor_config(
            actor_yaml, policy_loss__loss_mode=mode, loss_agg_mode=agg_mode, policy_loss__beta=0.0
        )
        out[mode] = _loss_and_grad(
            lambda lp: _verl_call(config, lp, old, adv, rs_mask, rollout_is_weights=weights), logp
        )
    (v_loss, v_grad, _), (r_loss, r_grad, r_m) = out["vanilla"], out[verl_name]
    # verl's seq-mean-token-mean divides by (length + 1e-8): up to 1e-9 relative here
    rtol = 1e-8 if agg_mode == "seq-mean-token-mean" else 1e-10
    torch.testing.assert_close(r_loss, v_loss, rtol=rtol, atol=0)
    torch.testing.assert_close(r_grad, v_grad, rtol=rtol, atol=1e-15)
    assert r_grad[~rs_mask].abs().max() == 0  # rejected and padding tokens: no gradient
    if weights is not None:
        # the weights changed the loss (else this comparison would prove little)
        plain, _, _ = _loss_and_grad(lambda lp: _verl_call(config, lp, old, adv, rs_mask), logp)
        assert not torch.isclose(plain, r_loss, rtol=1e-6, atol=0)
        want = float(weights[rs_mask].mean())
        assert r_m["actor/rpg/rollout_is_weight_mean"] == pytest.approx(want, rel=1e-12)
    else:
        assert "actor/rpg/rollout_is_weight_mean" not in r_m


#: rpgrl losses whose token loss depends on that token's log-prob only (gspo's depends on the
#: sequence ratio, so only sequence-constant weights scale its gradient token by token).
TOKEN_FACTORED = [n for n in rv.VERL_LOSS_NAMES if rv.VERL_LOSS_NAMES[n] != "gspo"]


@pytest.mark.parametrize("verl_name, correction", [
    (n, c) for n in rv.VERL_LOSS_NAMES for c in ("token_tis", "token_icepop", "seq_tis")
    if n in TOKEN_FACTORED or c == "seq_tis"
])
def test_rollout_weights_scale_each_token_gradient(actor_yaml, verl_name, correction):
    """beta > 0 (KL term on): grad with weights = weight x grad without, token by token; so the
    trust region, dual clip and KL act on w = pi_theta/pi_old, untouched by the weights."""
    config = _actor_config(actor_yaml, policy_loss__loss_mode=verl_name)
    assert config.policy_loss.beta == BETA
    logp, old, adv, mask = _tensors(seed=6)
    weights, _, _ = _rollout_correction(old, mask, 2, **ROLLOUT_CORRECTIONS[correction])
    w_loss, w_grad, w_m = _loss_and_grad(lambda lp: _verl_call(config, lp, old, adv, mask, rollout_is_weights=weights), logp)
    p_loss, p_grad, p_m = _loss_and_grad(lambda lp: _verl_call(config, lp, old, adv, mask), logp)
    torch.testing.assert_close(w_grad, weights * p_grad, rtol=1e-12, atol=1e-16)
    assert (p_grad[mask] != 0).sum() > mask.sum() / 2 and not torch.equal(w_grad, p_grad)
    for key in ("actor/rpg/clipfrac_upper", "actor/rpg/clipfrac_lower", "actor/rpg/importance_weight_mean",
                "actor/rpg/kl_rollout_k3"):
        assert w_m[key] == p_m[key], key  # the trust region and KL see w alone


def test_rollout_weights_are_the_only_change_to_policy_loss(actor_yaml):
    """The plugin's call equals rpgrl.losses.policy_loss(..., weights=rollout_is_weights)."""
    config = _actor_config(actor_yaml, policy_loss__loss_mode="rpg_reinforce_ufkl")
    logp, old, adv, mask = _tensors(seed=7)
    weights, _, _ = _rollout_correction(old, mask, 3, **ROLLOUT_CORRECTIONS["seq_tis"])
    got, got_grad, _ = _loss_and_grad(lambda lp: _verl_call(config, lp, old, adv, mask, rollout_is_weights=weights), logp)
    want, want_grad, _ = _loss_and_grad(
        lambda lp: policy_loss("rpg_reinforce_ufkl", lp, old, adv, mask, beta=BETA, clip=CLIP, dual_clip=DUAL,
                               norm=25.0, weights=weights),
        logp,
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-16)


# --- bypass mode (algorithm.rollout_correction.bypass_mode=true): pi_old = the rollout's log-probs ---


def test_bypass_mode_makes_the_rollout_log_probs_pi_old():
    """verl's own substitution (legacy driver: apply_bypass_mode; v1 does the same in
    trainer_base.py:1641-1648): old_log_probs := rollout_log_probs, no rollout_is_weights. It
    also sets loss_mode="bypass_mode" in the *driver's* copy of the actor config, which the
    remote actor workers never receive: they keep the configured (rpgrl) loss."""
    from verl import DataProto
    from verl.trainer.ppo.rollout_corr_helper import apply_bypass_mode

    logp, old, adv, mask = _tensors(seed=8)
    rollout = _ref_log_prob(old, mask, 9)
    batch = DataProto.from_dict({"old_log_probs": old.clone(), "rollout_log_probs": rollout,
                                 "response_mask": mask.long(), "advantages": adv})
    cfg = _compose("algorithm.rollout_correction.bypass_mode=true", f"actor_rollout_ref.actor.policy_loss._target_={TARGET}",
                   "actor_rollout_ref.actor.policy_loss.loss_mode=rpg_ufkl")
    apply_bypass_mode(batch, cfg.algorithm.rollout_correction, cfg.actor_rollout_ref.actor.policy_loss)
    assert torch.equal(batch.batch["old_log_probs"], rollout) and not torch.equal(rollout, old)
    assert "rollout_is_weights" not in batch.batch
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "bypass_mode"  # the driver's copy only


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("verl_name", VANILLA_AT_BETA0)
def test_bypass_mode_at_beta0_equals_verls_bypass_ppo_clip_loss(actor_yaml, verl_name, agg_mode):
    """In bypass mode an rpgrl loss's w is pi_theta / pi_rollout (the trust region clips the
    sampler's ratio, docs/math.md §1: pi_old is whatever sampled). At beta = 0 the value and
    gradient equal verl's own ``bypass_mode`` loss (loss_type=ppo_clip: vanilla PPO on the same
    ratio, no extra weight); beta > 0 adds RPG's KL to the rollout policy."""
    logp, old, adv, mask = _tensors(seed=10)
    rollout = _ref_log_prob(old, mask, 11)  # old_log_probs after the substitution above
    corr = OmegaConf.to_container(_compose("algorithm.rollout_correction.bypass_mode=true").algorithm.rollout_correction)
    with pytest.warns(UserWarning, match="not an rpgrl loss"):
        verl_cfg = _actor_config(actor_yaml, policy_loss__loss_mode="bypass_mode", loss_agg_mode=agg_mode,
                                 policy_loss__rollout_correction=corr)
    rpg_cfg = _actor_config(actor_yaml, policy_loss__loss_mode=verl_name, loss_agg_mode=agg_mode, policy_loss__beta=0.0)
    v_loss, v_grad, _ = _loss_and_grad(lambda lp: _verl_call(verl_cfg, lp, rollout, adv, mask), logp)
    r_loss, r_grad, r_m = _loss_and_grad(lambda lp: _verl_call(rpg_cfg, lp, rollout, adv, mask), logp)
    torch.testing.assert_close(r_loss, v_loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(r_grad, v_grad, rtol=1e-10, atol=1e-15)
    assert r_m["actor/rpg/importance_weight_mean"] != 1.0 and "actor/rpg/rollout_is_weight_mean" not in r_m
    if verl_name != "rpgrl_ppo":  # the KL term is RPG's addition: at beta > 0 the losses differ
        kl_cfg = _actor_config(actor_yaml, policy_loss__loss_mode=verl_name, loss_agg_mode=agg_mode)
        k_loss, _, _ = _loss_and_grad(lambda lp: _verl_call(kl_cfg, lp, rollout, adv, mask), logp)
        assert not torch.isclose(k_loss, v_loss, rtol=1e-6, atol=0)


# --- the iterative reference (fixed / periodic / adaptive anchors, rpgrl.integrations.verl_anchor) ---


def _ref_log_prob(old, mask, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.where(mask, old + 0.4 * torch.randn(old.shape, generator=g, dtype=DT), 0.0)


@pytest.mark.parametrize("verl_name", ["rpg_ufkl", "rpg_reinforce_urkl", "rpgrl_grpo_corrected"])
def test_anchored_loss_hands_ref_log_prob_to_the_rpgrl_loss(actor_yaml, verl_name):
    """verl_anchor's wrapper around verl's own ppo_loss: the micro-batch's ref_log_prob is the
    rpgrl loss's anchor (value and gradient = policy_loss(..., anchor_logp=ref), float64)."""
    from functools import partial

    from rpgrl.integrations.verl_anchor import AnchoredLoss

    config = _actor_config(actor_yaml, policy_loss__loss_mode=verl_name, policy_loss__anchor="fixed")
    logp, old, adv, mask = _tensors(seed=8)
    ref = _ref_log_prob(old, mask, 9)
    loss_fn = AnchoredLoss(partial(ppo_loss, config=config))
    seen = {}

    def through_wrapper(lp):
        B = lp.shape[0]
        pieces = []
        for i, n in enumerate(mask.sum(-1).tolist()):
            pieces += [torch.zeros(P - 1, dtype=DT), lp[i, :n], torch.zeros(1, dtype=DT)]
        data = TensorDict({
            "prompts": torch.ones(B, P, dtype=torch.long), "responses": torch.ones(B, T, dtype=torch.long),
            "attention_mask": torch.cat([torch.ones(B, P, dtype=torch.long), mask.long()], dim=1),
            "response_mask": mask.long(), "old_log_probs": old, "advantages": adv, "ref_log_prob": ref,
        }, batch_size=[B])
        tu.assign_non_tensor(data, dp_size=DP_SIZE, batch_num_tokens=BATCH_NUM_TOKENS, global_batch_size=GLOBAL_BATCH_SIZE)
        loss, metrics = loss_fn(model_output={"log_probs": torch.cat(pieces)}, data=data, dp_group=None)
        seen.update({k: getattr(v, "aggregate", lambda v=v: v)() for k, v in metrics.items()})
        return loss, seen

    got, got_grad, metrics = _loss_and_grad(through_wrapper, logp)
    name = rv.VERL_LOSS_NAMES[verl_name]
    want, want_grad, _ = _loss_and_grad(
        lambda lp: policy_loss(name, lp, old, adv, mask, ref, beta=BETA, clip=CLIP, dual_clip=DUAL, norm=25.0), logp
    )
    rollout, _ = policy_loss(name, logp, old, adv, mask, beta=BETA, clip=CLIP, dual_clip=DUAL, norm=25.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-16)
    assert not torch.isclose(got, rollout, rtol=1e-6, atol=0)  # the anchor changed the loss
    # KL to the anchor (log pi_theta/pi_ref) differs from the KL to the rollout policy
    log_rho = torch.where(mask, logp - ref, 0.0)
    assert metrics["actor/rpg/kl_anchor_k1"] == pytest.approx(float(log_rho.sum() / mask.sum()), rel=1e-12)
    assert metrics["actor/rpg/kl_anchor_k1"] != pytest.approx(metrics["actor/rpg/kl_rollout_k1"], rel=1e-3)


def test_non_rollout_anchor_without_verl_anchor_is_refused(actor_yaml):
    """Plain verl.trainer.main_ppo cannot hand ref_log_prob to the loss: say what to run instead."""
    config = _actor_config(actor_yaml, policy_loss__anchor="periodic")
    logp, old, adv, mask = _tensors()
    with pytest.raises(ValueError, match="python -m rpgrl.integrations.verl_anchor"):
        _verl_call(config, logp, old, adv, mask)


def test_anchored_loss_without_ref_log_prob_explains(actor_yaml):
    from rpgrl.integrations.verl_anchor import AnchoredLoss

    with pytest.raises(ValueError, match="use_kl_loss=true, kl_loss_coef=0"):
        AnchoredLoss(lambda **_: None)(model_output={}, data=TensorDict({"response_mask": torch.ones(2, 3)}, batch_size=[2]))


def test_prepare_config_loads_the_reference_without_a_kl_term():
    from rpgrl.integrations.verl_anchor import prepare_config

    base = (
        f"actor_rollout_ref.actor.policy_loss._target_={TARGET}",
        "actor_rollout_ref.actor.policy_loss.loss_mode=rpg_ufkl",
    )
    cfg = _compose(*base, "+actor_rollout_ref.actor.policy_loss.anchor=periodic")
    assert not cfg.actor_rollout_ref.actor.use_kl_loss
    assert prepare_config(cfg) == "periodic"
    assert cfg.actor_rollout_ref.actor.use_kl_loss and cfg.actor_rollout_ref.actor.kl_loss_coef == 0.0
    from verl.trainer.ppo.utils import need_reference_policy

    assert need_reference_policy(cfg)
    rollout = _compose(*base)
    assert prepare_config(rollout) == "rollout" and not rollout.actor_rollout_ref.actor.use_kl_loss
    with pytest.raises(ValueError, match="set actor_rollout_ref.actor.policy_loss.loss_mode to an rpgrl loss"):
        prepare_config(_compose(f"actor_rollout_ref.actor.policy_loss._target_={TARGET}",
                                "+actor_rollout_ref.actor.policy_loss.anchor=fixed"))
    with pytest.raises(ValueError, match="anchor_period must be an integer >= 1"):
        prepare_config(_compose(*base, "+actor_rollout_ref.actor.policy_loss.anchor=periodic",
                                "+actor_rollout_ref.actor.policy_loss.anchor_period=0"))


def test_swap_actor_worker_replaces_verls_worker_class():
    import ray
    from verl.trainer.ppo.utils import Role
    from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker

    from rpgrl.integrations.verl_anchor import RPGActorRolloutRefWorker, _original_class, swap_actor_worker

    mapping = {Role.ActorRolloutRef: ray.remote(ActorRolloutRefWorker), Role.Critic: ray.remote(TrainingWorker)}
    assert swap_actor_worker(mapping) == 1
    assert _original_class(mapping[Role.ActorRolloutRef]) is RPGActorRolloutRefWorker
    assert _original_class(mapping[Role.Critic]) is TrainingWorker
    # the overridden worker methods keep verl's dispatch registration (else Ray would not expose them)
    from verl.single_controller.base.decorator import MAGIC_ATTR

    def describe(attrs):
        mode = attrs["dispatch_mode"]
        if isinstance(mode, dict):  # make_nd_compute_dataproto_dispatch_fn(mesh_name)
            mode = ("nd", mode["dispatch_fn"].args, mode["collect_fn"].args)
        return mode, attrs["execute_mode"], attrs["blocking"]

    for method in ("init_model", "compute_ref_log_prob", "update_actor", "save_checkpoint", "load_checkpoint"):
        mine, verls = getattr(RPGActorRolloutRefWorker, method), getattr(ActorRolloutRefWorker, method)
        assert mine is not verls
        assert describe(getattr(mine, MAGIC_ATTR)) == describe(getattr(verls, MAGIC_ATTR)), method


def test_anchor_kl_k3_by_hand():
    from rpgrl.integrations.verl_anchor import anchor_kl_k3

    old = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -2.0, 9.0]])
    mask = torch.tensor([[1, 1, 0]])
    total, count, gap = anchor_kl_k3(old, ref, mask)
    # k3 = y - 1 - log y with y = pi_anc/pi_old = e^-0.5 and e^0; the masked token is ignored
    assert count == 2 and total == pytest.approx(math.exp(-0.5) - 1 + 0.5, rel=1e-12)
    assert gap == 0.5  # max |log pi_old - log pi_anc| over the valid tokens (not the masked 9.5)
    assert anchor_kl_k3(old, old, mask) == (0.0, 2.0, 0.0)


@pytest.mark.parametrize("runner", ["AnchoredTaskRunner", "AnchoredTaskRunnerV1"])
def test_anchored_task_runners_survive_rays_by_value_shipping(tmp_path, runner):
    """Ray ships an actor class by value (cloudpickle of its modified class); the copy must be
    constructible in a fresh process (a zero-argument super() in a copied verl __init__ was not)."""
    from ray import cloudpickle

    import rpgrl.integrations.verl_anchor as va

    blob = tmp_path / "cls.pkl"
    blob.write_bytes(cloudpickle.dumps(getattr(va, runner).__ray_metadata__.modified_class))
    code = f"from ray import cloudpickle\nC = cloudpickle.loads(open({str(blob)!r}, 'rb').read())\nC()\nprint('built')"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               VERL_USE_EXTERNAL_PLUGINS="none")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("built"), out.stderr[-3000:]


@pytest.mark.parametrize("verl_name", ["rpgrl_ppo", "rpg_ufkl"])
def test_bf16_log_probs_are_scored_in_the_promoted_dtype(actor_yaml, verl_name):
    """verl's FSDP actor can hand bf16 log-probs with fp32 old log-probs and weights. verl's own
    losses then compute in fp32 (log_prob - old_log_prob promotes); the rpgrl loss must too,
    else weights like 1.0012 round to 1.0 in bf16 (seen in a real CPU run)."""
    config = _actor_config(actor_yaml, policy_loss__loss_mode=verl_name, policy_loss__beta=0.0)
    with pytest.warns(UserWarning, match="not an rpgrl loss"):
        vanilla = _actor_config(actor_yaml, policy_loss__loss_mode="vanilla")
    logp, old, adv, mask = (t.float() if t.is_floating_point() else t for t in _tensors(seed=10))
    weights = torch.where(mask, 1.0 + 0.001 * torch.arange(1, T + 1, dtype=torch.float32), 0.0)
    logp_bf16 = logp.bfloat16()
    got, _, m = _loss_and_grad(lambda lp: _verl_call(config, lp, old, adv, mask, rollout_is_weights=weights), logp_bf16)
    want, _, _ = _loss_and_grad(lambda lp: _verl_call(vanilla, lp, old, adv, mask, rollout_is_weights=weights), logp_bf16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert m["actor/rpg/rollout_is_weight_mean"] == pytest.approx(float(weights[mask].double().mean()), rel=1e-6)



@pytest.mark.medium  # starts a local Ray (~20-30 s on 2 cores)
def test_rpgrl_ray_checkpoint_engine_round_trip(tmp_path):
    """``rollout.checkpoint_engine.backend=rpgrl_ray`` (the CPU stand-in for verl's nccl engine in
    disaggregated pipelines) through verl's registry and its build_topology/init_process_group
    protocol, on a real local Ray: every actor rank drains its weight generator (FSDP gathers
    need all ranks), rank 0's tensors reach the rollout side, the next sync's token does
    not return the previous weights, and a receive whose trainer never sends times out."""
    code = textwrap.dedent("""
        import asyncio, ray, torch
        from verl.checkpoint_engine.base import CheckpointEngineRegistry
        from rpgrl.integrations.verl_cpu import checkpoint as ck
        import sys
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _temp_dir=sys.argv[1])
        try:
            cls = CheckpointEngineRegistry.get("rpgrl_ray")
            assert cls is ck.RayCheckpointEngine
            drained = []
            def gen(rank, weights):
                for name, t in weights.items():
                    drained.append((rank, name))
                    yield name, t
            for sync in range(2):
                actor, rollout = cls.build_topology(2, 1, [{}] * 3)
                senders = [CheckpointEngineRegistry.new("rpgrl_ray", is_master=r == 0) for r in range(2)]
                for r, eng in enumerate(senders):
                    eng.init_process_group(**{k: v[r] for k, v in actor.items()})
                recv = CheckpointEngineRegistry.new("rpgrl_ray")
                recv.init_process_group(**{k: v[0] for k, v in rollout.items()})
                weights = {"w": torch.full((2, 3), float(sync)), "b": torch.arange(4.0) + sync}
                async def send():
                    # rank 1 holds other values (its shard): only rank 0's arrive
                    await asyncio.gather(senders[0].send_weights(gen(0, weights)),
                                         senders[1].send_weights(gen(1, {k: -v for k, v in weights.items()})))
                asyncio.run(send())
                got = dict(recv.receive_weights())
                assert sorted(got) == ["b", "w"] and all(torch.equal(got[k], weights[k]) for k in weights), got
            assert sorted(drained) == sorted([(r, n) for r in (0, 1) for n in ("w", "b")] * 2), drained
            # a trainer that never sends: the rollout fails after fetch_timeout_s instead of waiting forever
            _, rollout = cls.build_topology(1, 1, [{}] * 2)
            lonely = CheckpointEngineRegistry.new("rpgrl_ray", fetch_timeout_s=0.5)
            lonely.init_process_group(**{k: v[0] for k, v in rollout.items()})
            try:
                list(lonely.receive_weights())
                raise AssertionError("receive_weights returned without weights")
            except TimeoutError as e:
                assert "no weights arrived within 0.5 s" in str(e) and "fetch_timeout_s" in str(e), e
        finally:
            ray.shutdown()
        print("round trip ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    ray_dir = tempfile.mkdtemp(prefix="rpgrl-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        out = subprocess.run([sys.executable, "-c", code, ray_dir], env=env, capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("round trip ok"), (out.stdout[-2000:], out.stderr[-4000:])

@pytest.mark.parametrize("trainer", ["legacy", "v1"])
def test_cpu_launcher_overrides_compose_with_verl_config(tmp_path, trainer):
    """rpgrl.integrations.verl_cpu's overrides are valid for verl 0.9.1's config: fp32 compute
    for the actor and the reference (verl's FSDP engine defaults to bf16), an fp32 rollout
    unless asked otherwise, and the anchored entry point only for a non-rollout anchor."""
    from rpgrl.integrations.verl_cpu.run import entry_module, overrides

    anchor = [f"+actor_rollout_ref.actor.policy_loss.anchor=periodic", "actor_rollout_ref.rollout.dtype=bfloat16"]
    o = overrides(tmp_path / "model", tmp_path / "train.parquet", tmp_path, trainer=trainer, extra=anchor)
    cfg = _compose(*o)
    arr = cfg.actor_rollout_ref
    for node in (arr.actor.fsdp_config, arr.ref.fsdp_config):
        assert dict(node.mixed_precision) == {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
        assert node.strategy == "fsdp2" and node.model_dtype == "fp32"
    assert arr.rollout.dtype == "bfloat16" and arr.rollout.calculate_log_probs  # extra overrides win
    pl = omega_conf_to_dataclass(arr.actor).policy_loss
    assert (type(pl), pl.anchor) == (rv.RPGPolicyLossConfig, "periodic")
    assert cfg.trainer.use_v1 == (trainer == "v1")
    assert entry_module(anchor) == "rpgrl.integrations.verl_anchor"
    assert entry_module([]) == entry_module(["+actor_rollout_ref.actor.policy_loss.anchor=rollout"]) == "verl.trainer.main_ppo"
    assert _compose(*overrides(tmp_path / "m", tmp_path / "d", tmp_path, trainer=trainer)).actor_rollout_ref.rollout.dtype == "float32"
