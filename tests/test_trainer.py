"""The online loop end to end on the tiny model: presets, anchors, resume, outputs."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from safetensors.torch import load_file

from informative import PREFIX_RANK, check_grad_norms, record_batches

from rpgrl.config import PRESETS, load_config
from rpgrl.models.loading import load_policy
from rpgrl.loop.tracking import read_metrics
from rpgrl.loop.trainer import Trainer

pytestmark = pytest.mark.medium


def _quiet(*_a, **_k):
    pass


def make_trainer(overrides, resume=False) -> Trainer:
    return Trainer(load_config(overrides=overrides), resume=resume, log=_quiet)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_two_steps(preset, tiny_overrides, tmp_path, monkeypatch):
    seen = record_batches(monkeypatch)
    t = make_trainer(tiny_overrides(f"algorithm.preset={preset}", "eval.before_training=false", PREFIX_RANK))
    summary = t.train()
    assert summary["steps"] == 2 and summary["algorithm"] == preset
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "actor/loss" in r]
    # dynamic sampling skips a step in which no group's scores differ
    assert [r["step"] for r in rows] == [1, 2] or t.cfg.algorithm.dynamic_sampling.enabled
    check_grad_norms(rows, seen)  # a step with signal in its first optimizer step has a gradient
    for r in rows:
        # 2 mini-batches of 2 prompts, also when dynamic sampling kept fewer groups
        assert r["actor/optimizer_steps"] == 2
        assert all(torch.isfinite(torch.tensor(float(v))) for v in r.values() if isinstance(v, (int, float)))
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_default_outputs(tiny_overrides, tmp_path, monkeypatch):
    from rpgrl.loop.run_state import KERNEL_ENV

    out = tmp_path / "run"
    for k in KERNEL_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")  # read by MKL at start-up only: recorded, no effect here
    summary = make_trainer(tiny_overrides("trainer.eval_every=1", "trainer.total_steps=3")).train()
    on_disk = json.loads((out / "summary.json").read_text())
    assert set(on_disk) >= {"eval_before", "eval_after", "wall_seconds", "steps", "algorithm", "machine"}
    # what decides the run's rounding, so whether a rerun elsewhere can be bit-for-bit
    machine = on_disk["machine"]
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and machine["threads"] == torch.get_num_threads()
    assert machine["torch"] == torch.__version__ and machine["device"] == "cpu" and machine["cpu"]
    assert machine["transformers"] and machine["python"].count(".") == 2
    assert machine["kernel_env"] == {"MKL_CBWR": "COMPATIBLE"}
    assert on_disk["steps"] == 3 and on_disk["algorithm"] == "rpg_reinforce_ufkl"
    assert 0.0 <= on_disk["eval_after"]["accuracy"] <= 1.0
    assert summary["eval_before"]["accuracy"] == on_disk["eval_before"]["accuracy"]
    assert (out / "curves.png").stat().st_size > 10_000
    assert (out / "config.yaml").is_file()
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "eval/accuracy" in r]
    assert steps == [0, 1, 2, 3]
    # the final model reloads through the generic HF path
    model = load_policy(out / "final", device=torch.device("cpu"), dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) > 0


def _count_models(cls) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is cls)


def test_rollout_anchor_keeps_one_model(tiny_overrides):
    from transformers import Qwen2ForCausalLM

    before = _count_models(Qwen2ForCausalLM)
    t = make_trainer(tiny_overrides())
    assert t.anchor.model is None
    assert _count_models(Qwen2ForCausalLM) - before == 1
    batch, _ = t.collect()
    t.prepare(batch)
    assert batch.anchor_logp is None  # the loss falls back to the stored rollout log-probs
    t2 = make_trainer(tiny_overrides("algorithm.anchor.mode=fixed"))
    assert t2.anchor.model is not None
    assert _count_models(Qwen2ForCausalLM) - before == 3


def _logp(model, batch, t):
    return t._logprobs(model, batch.rollout)[0]


def _run_steps(t: Trainer, n: int):
    for _ in range(n):
        t.step()


@pytest.mark.parametrize("mode,extra,refreshes", [
    ("fixed", [], False),
    ("periodic", ["algorithm.anchor.period_optimizer_steps=1"], True),
    ("periodic", ["algorithm.anchor.period_optimizer_steps=1000"], False),
    ("adaptive", ["algorithm.anchor.kappa=1e-12"], True),
    ("adaptive", ["algorithm.anchor.kappa=1e6"], False),
])
def test_anchor_logprobs_are_what_the_mode_claims(mode, extra, refreshes, tiny_overrides, monkeypatch):
    seen = record_batches(monkeypatch)
    t = make_trainer(tiny_overrides(f"algorithm.anchor.mode={mode}", "algorithm.beta=0.1",
                                    "optim.lr=1e-2", PREFIX_RANK, *extra))
    initial = load_policy(t.data.model_path, device=torch.device("cpu"), dtype=torch.float32)
    _run_steps(t, 2)  # 2 optimizer steps per batch -> the policy has moved, if one of them had a gradient:
    assert any(b.first_update_has_signal for b in seen), seen  # tests/informative.py
    batch, _ = t.collect()
    t.prepare(batch)
    mask = batch.rollout.response_mask.bool()
    current = batch.old_logp  # computed from the current policy at this batch boundary
    from_initial = _logp(initial, batch, t)
    assert not torch.allclose(current[mask], from_initial[mask], atol=1e-4)  # the policy did move
    if refreshes:
        assert t.anchor.refreshes >= 1
        torch.testing.assert_close(batch.anchor_logp[mask], current[mask], atol=1e-6, rtol=0)
    else:
        assert t.anchor.refreshes == 0
        torch.testing.assert_close(batch.anchor_logp[mask], from_initial[mask], atol=1e-6, rtol=0)


def test_periodic_anchor_refreshes_every_k_optimizer_steps(tiny_overrides):
    """K counts optimizer steps (docs/math.md §1.1), not batches: 4 optimizer steps per batch (one
    prompt per mini-batch) and K = 2 give refreshes after steps 2, 4 and 6 of the first 8
    (the one due after step 8, the batch's last, is taken before the next batch's anchor
    log-probs). Refreshing only at batch boundaries gave 1."""
    t = make_trainer(tiny_overrides("algorithm.anchor.mode=periodic", "algorithm.anchor.period_optimizer_steps=2",
                                    "trainer.mini_batch_prompts=1", PREFIX_RANK))
    _run_steps(t, 2)
    assert t.anchor.refreshes == 3 and t.anchor.due


def test_mid_batch_refresh_recomputes_the_remaining_anchor_logprobs(tiny_overrides):
    """K = 3 with 4 optimizer steps per batch: the refresh after step 3 re-scores the last
    mini-batch (one prompt = 4 sequences) under the new anchor; the other 12 rows keep the
    initial anchor's log-probs."""
    t = make_trainer(tiny_overrides("algorithm.anchor.mode=periodic", "algorithm.anchor.period_optimizer_steps=3",
                                    "trainer.mini_batch_prompts=1", "algorithm.beta=0.1",
                                    "optim.lr=1e-2", PREFIX_RANK))
    initial = load_policy(t.data.model_path, device=torch.device("cpu"), dtype=torch.float32)
    batch, _ = t.collect()
    t.prepare(batch)
    # More rows with A != 0 than the last mini-batch holds: one is in the first 3 optimizer
    # steps, so the policy moves before the refresh whatever was drawn (tests/informative.py).
    assert int((batch.advantages != 0).any(dim=1).sum()) > 4
    t.update(batch)
    assert t.anchor.refreshes == 1 and not t.anchor.due
    mask = batch.rollout.response_mask.bool()

    def same_rows(model) -> torch.Tensor:
        ref = _logp(model, batch, t)
        return ((batch.anchor_logp - ref).abs() * mask).amax(1) < 1e-5

    fresh, old = same_rows(t.anchor.model), same_rows(initial)
    assert int(fresh.sum()) == 4 and bool((fresh ^ old).all())


@pytest.mark.parametrize("optim", ["adamw", "schedulefree_adamw"])
def test_resume_matches_uninterrupted(optim, tiny_overrides, tmp_path):
    full = tiny_overrides(f"optim.name={optim}", "trainer.total_steps=4", "trainer.save_every=2",
                          out=tmp_path / "full")
    make_trainer(full).train()
    part = tiny_overrides(f"optim.name={optim}", "trainer.total_steps=2", "trainer.save_every=2",
                          out=tmp_path / "part")
    make_trainer(part).train()
    resumed = tiny_overrides(f"optim.name={optim}", "trainer.total_steps=4", "trainer.save_every=2",
                             out=tmp_path / "part")
    summary = make_trainer(resumed, resume=True).train()
    assert summary["steps"] == 4
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "part" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    train_rows = lambda p: [r for r in read_metrics(p / "metrics.jsonl") if "actor/loss" in r]  # noqa: E731
    ra, rb = train_rows(tmp_path / "full"), train_rows(tmp_path / "part")
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb):
        assert x["reward/mean"] == y["reward/mean"] and x["actor/loss"] == y["actor/loss"]


def test_old_logp_from_the_update_equals_a_separate_pass(tiny_overrides):
    """One optimizer step per batch: pi_old's log-probs come from the update's own forward."""
    import copy

    # Padded forwards: their values do not depend on which rows share a micro-batch, so the
    # two updates below are bit-comparable (shared prompts are exact only to round-off, which
    # Adam's first step, lr * g / |g|, would amplify; tests/test_prefix.py covers sharing).
    t = make_trainer(tiny_overrides("trainer.mini_batch_prompts=4", PREFIX_RANK, "optim.lr=1e-2",
                                    "trainer.share_prompts=false"))
    batch, _ = t.collect()
    t.prepare(batch)
    assert batch.old_logp is None and batch.old_logp_in_update  # prepare chose the shortcut
    signal = bool((batch.advantages != 0).any())  # tests/informative.py: all but certain
    separate = copy.deepcopy(batch)
    separate.old_logp, separate.entropy = t._logprobs(t.model, separate.rollout, with_entropy=True)
    separate.old_logp_in_update = False  # the same update, with pi_old from the separate pass
    model0, opt0 = copy.deepcopy(t.model.state_dict()), copy.deepcopy(t.optimizer.state_dict())
    m_fill = t.update(batch)
    after_fill = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.model.load_state_dict(model0)
    t.optimizer.load_state_dict(opt0)
    m_sep = t.update(separate)
    mask = batch.rollout.response_mask.bool()
    torch.testing.assert_close(batch.old_logp[mask], separate.old_logp[mask], atol=1e-6, rtol=0)
    torch.testing.assert_close(batch.entropy[mask], separate.entropy[mask], atol=1e-6, rtol=0)
    assert m_fill["actor/importance_weight_mean"] == pytest.approx(1.0, abs=1e-12)
    assert m_fill["actor/importance_weight_max"] == 1.0  # w = exp(logp - logp.detach()) exactly
    assert m_fill["actor/loss"] == pytest.approx(m_sep["actor/loss"], abs=1e-6)
    for k, v in t.model.state_dict().items():
        torch.testing.assert_close(v, after_fill[k], atol=1e-6, rtol=0, msg=k)
    # w = 1 exactly: with every advantage 0 the gradient, hence Adam's step, is exactly 0
    assert any(not torch.equal(after_fill[k], model0[k]) for k in model0) == signal
    assert signal
    # more than one mini-batch: the separate pass is required (later steps are off-policy)
    t2 = make_trainer(tiny_overrides(PREFIX_RANK))
    b2, _ = t2.collect()
    t2.prepare(b2)
    assert b2.old_logp is not None and not b2.old_logp_in_update
