"""User losses: a real ``rpgrl.losses`` entry point (a dist-info with
entry_points.txt on sys.path, found by importlib.metadata) and ``module:function`` paths,
resolved in one place (``rpgrl.losses.LOSSES``) and then usable by ``policy_loss``, the
config, ``rpgrl train``, ``RPGTrainer`` and the verl plugin without further code.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rpgrl.losses import LOSSES, UnknownLossError, policy_loss

MODULE = "rpgrl_test_plugin_losses"
PLUGIN_SOURCE = textwrap.dedent('''
    """Two user losses: a correct URKL REINFORCE loss and one that forgets a factor w."""
    import torch
    from rpgrl.losses import LossInputs, trust_region

    CALLS = []


    def urkl_reinforce(x: LossInputs):
        """REINFORCE with g = w*A - beta*w*log(rho) (Prop. 3.6), PPO trust region on sign(A)."""
        CALLS.append(tuple(x.logp.shape))
        r = x.ratios(grad=False)
        g = r.w * x.advantages - x.beta * r.w * r.log_rho
        region = trust_region(x.advantages >= 0, r.w, x.clip, x.dual_clip)
        logp = x.logp if region.stopped is None else torch.where(region.stopped, x.logp.detach(), x.logp)
        return -g * logp, region


    urkl_reinforce.objective = "urkl"


    def urkl_wrong(x: LossInputs):
        """Forgets the importance weight on the KL part: -beta*log(rho) instead of -beta*w*log(rho)."""
        r = x.ratios(grad=False)
        g = r.w * x.advantages - x.beta * r.log_rho
        return -g * x.logp


    urkl_wrong.objective = "urkl"


    def bad_shape(x):
        return x.logp.sum()


    NOT_CALLABLE = 3
''')
ENTRY_POINTS = textwrap.dedent(f"""
    [rpgrl.losses]
    my_urkl = {MODULE}:urkl_reinforce
    my_wrong = {MODULE}:urkl_wrong
    my_broken = {MODULE}_missing:nothing
""")


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """A real installed distribution: module + rpgrl_test_plugin-0.1.dist-info on sys.path."""
    root = tmp_path_factory.mktemp("site")
    (root / f"{MODULE}.py").write_text(PLUGIN_SOURCE)
    info = root / "rpgrl_test_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rpgrl-test-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    sys.path.insert(0, str(root))
    import importlib

    importlib.invalidate_caches()
    yield importlib.import_module(MODULE)
    sys.path.remove(str(root))
    sys.modules.pop(MODULE, None)
    for name in ("my_urkl", "my_wrong", f"{MODULE}:urkl_reinforce"):
        LOSSES.forget(name)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(4, 5, generator=g, dtype=torch.float64) * 2 - 0.05).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    adv = torch.randn(4, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 5, generator=g) > 0.2
    return logp, old, adv, mask


def test_entry_point_is_found_listed_and_equals_the_builtin(plugin):
    assert "my_urkl" in LOSSES and "my_urkl" in list(LOSSES)
    spec = LOSSES["my_urkl"]
    assert spec.kernel == "plugin" and spec.objective == "urkl"
    assert spec.source == f"entry point my_urkl = {MODULE}:urkl_reinforce"
    # the user's REINFORCE URKL has the built-in's gradient (clipping on: same trust region
    # for A < 0 / A >= 0 tokens as long as the KL does not flip psi's sign; beta small)
    logp, old, adv, mask = _batch()
    kw = dict(beta=1e-4, clip=(0.2, 0.28), dual_clip=10.0)
    mine, m1 = policy_loss("my_urkl", logp, old, adv, mask, **kw)
    ref, m2 = policy_loss("rpg_reinforce_urkl", logp, old, adv, mask, **kw)
    g1, g2 = (torch.autograd.grad(v, logp)[0] for v in (mine, ref))
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)
    assert set(m1) == set(m2) and float(m1["clipfrac_upper"]) == float(m2["clipfrac_upper"])


def test_module_function_path_resolves(plugin):
    path = f"{MODULE}:urkl_reinforce"
    assert LOSSES[path].source == f"path {path}"
    logp, old, adv, mask = _batch(1)
    a, _ = policy_loss(path, logp, old, adv, mask)
    b, _ = policy_loss("my_urkl", logp, old, adv, mask)
    assert float(a) == float(b)


@pytest.mark.parametrize("name,needle", [
    ("no_such_loss", "'no_such_loss' is not one of the known losses: rpg_fkl"),
    ("my_broken", "loading the rpgrl.losses entry point my_broken"),
    ("nonexistent_pkg_xyz:f", "cannot import module 'nonexistent_pkg_xyz'"),
    (f"{MODULE}:missing", "has no attribute 'missing'"),
    (f"{MODULE}:NOT_CALLABLE", "is a int, expected a function"),
])
def test_unresolvable_names_say_why(plugin, name, needle):
    assert name not in LOSSES
    with pytest.raises(UnknownLossError) as err:
        LOSSES.resolve(name)
    assert needle in str(err.value)


def test_contract_violation_names_the_loss(plugin):
    logp, old, adv, mask = _batch()
    with pytest.raises(ValueError, match=r"bad_shape.*must return a floating \[B, T\] token loss"):
        policy_loss(f"{MODULE}:bad_shape", logp, old, adv, mask)


def test_config_accepts_plugins_and_names_import_errors(plugin):
    from rpgrl.config import ConfigError, load_config

    assert load_config(overrides=["algorithm.loss=my_urkl"]).algorithm.loss == "my_urkl"
    with pytest.raises(ConfigError, match="algorithm.loss: loss 'nonexistent_pkg_xyz:f': cannot import"):
        load_config(overrides=["algorithm.loss=nonexistent_pkg_xyz:f"])


@pytest.mark.medium
def test_entry_point_loss_trains_two_steps_with_rpgrl_train(plugin, tiny_overrides, tmp_path, capsys, monkeypatch):
    """The plugin's loss trains: a step whose first optimizer step holds a non-zero advantage
    has a non-zero gradient (tests/informative.py; with the built-in exact-match scorer a
    30-step warm start rarely answers right, and on one CPU a whole step drew equal rewards)."""
    from informative import PREFIX_RANK, check_grad_norms, record_batches

    from rpgrl.cli import main
    from rpgrl.loop.tracking import read_metrics

    plugin.CALLS.clear()
    seen = record_batches(monkeypatch)
    rc = main(["train", *tiny_overrides("algorithm.loss=my_urkl", "algorithm.beta=0.05",
                                        "eval.before_training=false", PREFIX_RANK)])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2
    assert len(plugin.CALLS) > 0  # the plugin computed the loss of every micro-batch
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "actor/loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    check_grad_norms(rows, seen)


@pytest.mark.medium
def test_entry_point_loss_in_rpgrl_compare(plugin, tiny_overrides, tmp_path):
    """``rpgrl compare --algorithms ppo my_urkl``: a loss name runs beside a preset."""
    from rpgrl.tools.compare import main as compare_main

    plugin.CALLS.clear()
    rc = compare_main(["compare", "--algorithms", "ppo", "my_urkl", "--seeds", "1", "--out", str(tmp_path / "cmp"),
                       *tiny_overrides("eval.before_training=false", "algorithm.beta=0.05")])
    assert rc == 0 and len(plugin.CALLS) > 0
    results = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert results["my_urkl"][0]["algorithm"] == "my_urkl" and results["my_urkl"][0]["steps"] == 2
    cfg = (tmp_path / "cmp" / "my_urkl" / "seed0" / "config.yaml").read_text()
    assert "loss: my_urkl" in cfg
    assert "| my_urkl | 1 |" in (tmp_path / "cmp" / "comparison.md").read_text()


@pytest.mark.medium
def test_entry_point_loss_trains_two_steps_with_rpg_trainer(plugin, tmp_path):
    pytest.importorskip("trl", exc_type=ImportError)
    from datasets import Dataset

    from rpgrl.integrations.trl import RPGConfig, RPGTrainer
    from rpgrl.models.tiny import TinyModelConfig, build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{a}+{b}"}]} for a, b in [(1, 2), (3, 4)]])

    def digits(completions, **_):
        text = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in text]

    args = RPGConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, max_steps=2, seed=0,
                     num_generations=4, per_device_train_batch_size=8, max_completion_length=6,
                     num_iterations=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", beta=0.05,
                     rpg_loss="my_urkl")
    plugin.CALLS.clear()
    trainer = RPGTrainer(model=model, reward_funcs=[digits], args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    assert trainer.state.global_step == 2
    assert len(plugin.CALLS) == 2  # one micro-batch per optimizer step, both through the plugin
    assert all("rpg/importance_weight_mean" in h for h in trainer.state.log_history[:2])


def test_entry_point_loss_is_a_verl_policy_loss(plugin):
    pytest.importorskip("verl", exc_type=ImportError)
    from verl.trainer.ppo import core_algos

    import rpgrl.integrations.verl as rv

    names = rv.register()  # picks up entry points installed after import
    assert "rpgrl_my_urkl" in names and "rpgrl_my_broken" not in names
    fn = core_algos.get_policy_loss_fn("rpgrl_my_urkl")
    logp, old, adv, mask = _batch(2)
    config = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 10.0,
              "policy_loss": {"beta": 0.05}, "global_batch_info": {}}
    adv_bt = torch.where(mask, adv[:, None], 0.0)
    loss, metrics = fn(old, logp, adv_bt, mask.long(), "token-mean", config)
    want, _ = policy_loss("my_urkl", logp, old, adv_bt, mask, beta=0.05, clip=(0.2, 0.28), dual_clip=10.0)
    assert float(loss) == pytest.approx(float(want), rel=1e-12)
    assert "actor/rpg/clipfrac_upper" in metrics
    # a module:function loss_mode registers itself when the policy-loss config is built
    cfg = rv.RPGPolicyLossConfig(loss_mode=f"{MODULE}:urkl_reinforce", beta=0.05)
    assert core_algos.get_policy_loss_fn(cfg.loss_mode).__name__ == f"rpgrl_{MODULE}:urkl_reinforce"
