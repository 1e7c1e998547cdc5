"""``rpgrl check-loss`` / ``rpgrl explain``: the exact-enumeration proof of a
loss's gradient, shared by the CLI and these tests (rpgrl.losses.check)."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest

from rpgrl.cli import main
from rpgrl.losses import DIVERGENCES, LOSSES
from rpgrl.losses.check import check_loss, explain_rows

RPG_NAMES = [f"rpg_{d}" for d in DIVERGENCES] + [f"rpg_reinforce_{d}" for d in DIVERGENCES]
MODULE = "rpgrl_check_plugin"


@pytest.fixture(scope="module")
def plugin_module(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkplugin")
    (root / f"{MODULE}.py").write_text(textwrap.dedent('''
        from rpgrl.losses import LossInputs

        def ufkl_ok(x: LossInputs):
            """REINFORCE UFKL, unclipped: g = w*A - beta*(w - v)."""
            r = x.ratios(grad=False)
            return -(r.w * x.advantages - x.beta * (r.w - r.v)) * x.logp

        def ufkl_wrong(x: LossInputs):
            """The classic slip: the KL weight against the anchor without v, -beta*(w - 1)."""
            r = x.ratios(grad=False)
            return -(r.w * x.advantages - x.beta * (r.w - 1.0)) * x.logp

        ufkl_ok.objective = ufkl_wrong.objective = "ufkl"
    '''))
    sys.path.insert(0, str(root))
    yield MODULE
    sys.path.remove(str(root))
    sys.modules.pop(MODULE, None)
    for fn in ("ufkl_ok", "ufkl_wrong"):
        LOSSES.forget(f"{MODULE}:{fn}")


@pytest.mark.parametrize("name", RPG_NAMES)
def test_every_rpg_loss_passes_for_both_anchors(name):
    report = check_loss(name)
    assert report.passed, report.format()
    assert {(c.case, c.anchor) for c in report.cases} == {
        (case, a) for case in ("on-policy", "off-policy", "unnormalized") for a in ("rollout", "separate")}
    assert all(c.max_dev <= 1e-10 and c.scale > 1e-2 for c in report.cases if (c.case, c.anchor) != ("on-policy", "rollout"))
    # the mass-corrected and plain divergences are told apart on unnormalized measures
    div = name.rsplit("_", 1)[1]
    unnorm = [c for c in report.cases if c.case == "unnormalized"]
    assert all(c.matches == [div] for c in unnorm)
    assert sum(c.value is None or c.value <= 1e-12 for c in report.clip) == len(report.clip)


def test_grpo_reports_its_known_bias_and_what_it_converges_to():
    report = check_loss("grpo")
    assert not report.passed
    by = {(c.case, c.anchor): c for c in report.cases}
    # on-policy with a separate reference: the k3 term's gradient is the FORWARD KL's (and UFKL's)
    assert by[("on-policy", "separate")].matches == ["fkl", "ufkl"]
    assert by[("on-policy", "separate")].max_dev > 1e-3  # ... not the reverse KL's it estimates
    # off-policy it is the gradient of no divergence at all
    assert by[("off-policy", "separate")].matches == [] and by[("off-policy", "rollout")].matches == []
    text = report.format()
    assert "FORWARD KL" in text and text.rstrip().endswith("is NOT an exact gradient of E[A] - beta*urkl")
    assert check_loss("grpo_corrected").passed  # the paper's fix


def test_a_wrong_plugin_fails_and_a_right_one_passes(plugin_module, capsys):
    assert main(["check-loss", f"{MODULE}:ufkl_ok"]) == 0
    assert "PASS" in capsys.readouterr().out
    report = check_loss(f"{MODULE}:ufkl_wrong")
    assert not report.passed
    by = {(c.case, c.anchor): c for c in report.cases}
    assert by[("off-policy", "rollout")].max_dev <= 1e-10  # v = 1 there: the slip is invisible
    assert by[("off-policy", "separate")].max_dev > 1e-3  # with a separate anchor it is caught
    assert main(["check-loss", f"{MODULE}:ufkl_wrong", "--anchor", "separate"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and out.rstrip().endswith("is NOT an exact gradient of E[A] - beta*ufkl")
    # a loss with no declared objective needs --objective; a wrong one fails against it
    assert main(["check-loss", "rpg_reinforce_urkl", "--objective", "fkl", "--anchor", "rollout"]) == 1


def test_cli_exit_codes_and_output(capsys):
    assert main(["check-loss", "rpg_reinforce_ufkl", "--anchor", "rollout"]) == 0
    out = capsys.readouterr().out
    assert "off-policy     rollout" in out and "clip-region checks" in out
    assert out.rstrip().endswith("PASS: rpg_reinforce_ufkl is an exact gradient of E[A] - beta*ufkl")
    assert main(["check-loss", "no_such_loss"]) == 2
    assert "'no_such_loss' is not one of the known losses: rpg_fkl" in capsys.readouterr().err


def test_explain_coefficients_are_the_spec_weights():
    beta = 0.1
    rows = {(r["w"], r["A"]): r for r in explain_rows("rpg_reinforce_urkl", beta, (0.2, 0.28), 10.0)}
    r = rows[(1.1, 1.0)]  # inside the trust region: g = w*A - beta*w*log w (Prop. 3.6)
    assert r["g"] == pytest.approx(1.1 - beta * 1.1 * math.log(1.1), rel=1e-12)
    assert r["kl"] == pytest.approx(-beta * 1.1 * math.log(1.1), rel=1e-9) and not r["stopped"]
    r = rows[(1.5, 1.0)]  # beyond 1 + eps_high: RPG-Style Clip stops the whole token
    assert r["g"] == 0.0 and r["stopped"] and r["clipped"] == "upper"
    # the differentiable loss stops only the w*A part; its KL part keeps flowing (Algorithm 1)
    d = {(r["w"], r["A"]): r for r in explain_rows("rpg_urkl", beta, (0.2, 0.28), 10.0)}[(1.5, 1.0)]
    assert d["reward"] == 0.0 and d["kl"] == pytest.approx(-beta * 1.5 * math.log(1.5), rel=1e-9)
    # separate anchor: rho = w / v with v = 0.8
    s = {(r["w"], r["A"]): r for r in explain_rows("rpg_reinforce_urkl", beta, None, None, "separate")}[(2.0, -1.0)]
    assert s["g"] == pytest.approx(-2.0 - beta * 2.0 * math.log(2.0 / 0.8), rel=1e-12)


def test_explain_cli_prints_what_a_config_optimises(capsys):
    assert main(["explain", "algorithm.preset=grpo"]) == 0
    out = capsys.readouterr().out
    assert "loss grpo (built-in)" in out and "beta*(pi_ref/pi_theta - 1) (no w)" in out
    assert "caveat:" in out and "frozen" in out
    assert main(["explain", "algorithm.loss=nope"]) == 2
