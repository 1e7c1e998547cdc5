"""rpgrl.integrations.trl: RPGTrainer runs TRL's GRPO loop with rpgrl's policy_loss.

End-to-end: a tiny local Qwen2 (hidden 32, 2 layers) trains 3 steps on CPU with beta > 0 and
num_iterations=2 (off-policy on the second pass); every micro-batch loss TRL backpropagates
is checked against ``policy_loss`` recomputed from an independent forward pass.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl", exc_type=ImportError,
                    reason="TRL not installed (pip install 'trl>=1.9.2,!=1.15.0,<2')")
pytest.importorskip("datasets", reason="datasets (a TRL dependency) is not installed")

from datasets import Dataset  # noqa: E402

from rpgrl.integrations.trl import RPGConfig, RPGTrainer, rpg_norm  # noqa: E402
from rpgrl.integrations.verl_cpu.reward import compute_score as toy_score  # noqa: E402
from rpgrl.losses import policy_loss  # noqa: E402
from rpgrl.models.tiny import build_tiny_tokenizer  # noqa: E402

try:
    from rpgrl.rewards import compute_score
except ImportError:  # pragma: no cover - rewards module absent
    compute_score = None

PAIRS = [(12, 34), (5, 7), (20, 22), (31, 8)]


def _text(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def correct(completions, answer, **_):
    """1 for "Answer:46" on 12+34 (rpgrl's scorer when available)."""
    out = []
    for c, a in zip(completions, answer):
        if compute_score is not None:
            out.append(float(compute_score("rpgrl/add", _text(c), a)["score"]))
        else:
            out.append(float(_text(c).strip() == f"Answer:{a}"))
    return out


def prefix_rank(completions, answer, **_):
    """Dense shaping so a random tiny model gets non-zero advantages whatever it draws: the
    toy reward ties only completions with a common 4-token prefix (tests/informative.py; the
    share of digit characters, used before, tied a group of 4 with probability ~1.5e-3)."""
    return [toy_score("rpgrl/add", _text(c), a) for c, a in zip(completions, answer)]


def _dataset() -> Dataset:
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"{a}+{b}"}], "answer": str(a + b)}
                              for a, b in PAIRS])


class CheckedRPGTrainer(RPGTrainer):
    """Records, for every micro-batch, TRL's loss and the same loss recomputed independently."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.records = []

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        with torch.no_grad():
            p, c = inputs["prompt_ids"], inputs["completion_ids"]
            ids = torch.cat([p, c], dim=1)
            att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
            logits = model(input_ids=ids, attention_mask=att).logits[:, p.size(1) - 1:-1].float()
            logp = torch.log_softmax(logits / self.args.temperature, -1).gather(-1, c[..., None])[..., 0]
        self.records.append({
            "loss": loss.detach(), "logp": logp, "mask": inputs["completion_mask"].bool(),
            "old": inputs.get("old_per_token_logps"), "ref": inputs.get("ref_per_token_logps"),
            "adv": inputs["advantages"],
        })
        return loss


def _train(tiny_dir, tmp_path, **overrides) -> CheckedRPGTrainer:
    kw = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, max_steps=3, seed=0,
              num_generations=4, per_device_train_batch_size=8, max_completion_length=6,
              num_iterations=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", beta=0.05)
    kw.update(overrides)
    trainer = CheckedRPGTrainer(model=str(tiny_dir), reward_funcs=[correct, prefix_rank], args=RPGConfig(**kw),
                                train_dataset=_dataset(), processing_class=build_tiny_tokenizer())
    trainer.train()
    return trainer


def _expected(trainer, rec, norm=None):
    args = trainer.args
    old = rec["old"] if rec["old"] is not None else rec["logp"]
    anchor = rec["ref"] if args.rpg_anchor == "reference" else None
    return policy_loss(args.rpg_loss, rec["logp"], old, rec["adv"], rec["mask"], anchor, beta=args.beta,
                       clip=(args.epsilon, args.epsilon_high), dual_clip=args.rpg_dual_clip, agg=args.rpg_agg,
                       norm=norm)


@pytest.mark.parametrize("loss_name,anchor", [("rpg_reinforce_ufkl", "rollout"), ("rpg_urkl", "reference")])
def test_trainer_loss_is_policy_loss(tiny_dir, tmp_path, loss_name, anchor):
    trainer = _train(tiny_dir, tmp_path, rpg_loss=loss_name, rpg_anchor=anchor)
    # The rollout anchor needs no reference model even with beta > 0; "reference" loads TRL's.
    assert trainer.rpg_beta == 0.05 and trainer.args.beta == 0.05
    assert (trainer.ref_model is None) == (anchor == "rollout")
    recs = trainer.records
    assert len(recs) == 3  # 3 optimizer steps x 1 micro-batch
    # num_iterations=2 with GA=1 is off-policy: TRL must supply real rollout log-probs ...
    assert all(r["old"] is not None for r in recs)
    # ... and the second pass over a batch (step 2) sees a moved policy: w != 1. Step 1 is
    # on-policy, so it moved the policy if (and since the reward ties only common 4-token
    # prefixes, all but surely) one of its advantages is non-zero.
    assert recs[0]["adv"].abs().max() > 0
    assert (recs[1]["logp"] - recs[1]["old"])[recs[1]["mask"]].abs().max() > 1e-4
    for i, rec in enumerate(recs):
        if anchor == "reference":
            assert rec["ref"] is not None
        expected, metrics = _expected(trainer, rec)  # GA=1: norm = this micro-batch's tokens
        assert torch.allclose(rec["loss"], expected, rtol=1e-5, atol=1e-7), (i, rec["loss"], expected)
        logged = trainer.state.log_history[i]
        assert logged["rpg/importance_weight_mean"] == pytest.approx(metrics["importance_weight_mean"].item(),
                                                                      rel=1e-5)
        assert logged["rpg/kl_anchor_k3"] == pytest.approx(metrics["kl_anchor_k3"].item(), rel=1e-4, abs=1e-8)
    # beta really enters: on the off-policy step the beta=0 loss differs.
    no_kl, _ = policy_loss(loss_name, recs[1]["logp"], recs[1]["old"], recs[1]["adv"], recs[1]["mask"],
                           recs[1]["ref"] if anchor == "reference" else None, beta=0.0,
                           clip=(0.2, 0.28), dual_clip=10.0)
    assert not torch.allclose(no_kl, recs[1]["loss"], rtol=0, atol=1e-9)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_accumulated_micro_losses_are_the_global_mean(tiny_dir, tmp_path, agg):
    """GA=2: the micro-batch losses must add up to the loss of the whole optimizer step (docs/math.md §6)."""
    trainer = _train(tiny_dir, tmp_path, rpg_agg=agg, max_steps=1, num_iterations=1,
                     per_device_train_batch_size=4, gradient_accumulation_steps=2)
    a, b = trainer.records
    assert a["old"] is None  # on-policy: TRL skips the extra forward, logp.detach() is exact
    whole = {k: torch.cat([a[k], b[k]]) for k in ("logp", "mask", "adv")}
    whole.update(old=None, ref=None)
    expected, _ = _expected(trainer, whole)
    assert torch.allclose(a["loss"] + b["loss"], expected, rtol=1e-5, atol=1e-7)
    # and each micro loss alone is NOT its own mean (different token counts would show it)
    own, _ = _expected(trainer, a)
    assert torch.allclose(a["loss"], own * _count(a, agg) / _count(whole, agg), rtol=1e-5, atol=1e-7)


def test_two_steps_per_generation_share_the_generation_count(tiny_dir, tmp_path):
    """steps_per_generation=2, GA=1: each step's denominator is half the generation batch's
    token count (TRL's "dapo" normalizer), and step 2 is off-policy so old log-probs exist."""
    trainer = _train(tiny_dir, tmp_path, max_steps=2, num_iterations=1, per_device_train_batch_size=4,
                     steps_per_generation=2)
    a, b = trainer.records
    assert a["old"] is not None and b["old"] is not None
    norm = (a["mask"].sum() + b["mask"].sum()).item() / 2
    for rec in (a, b):
        expected, _ = _expected(trainer, rec, norm=norm)
        assert torch.allclose(rec["loss"], expected, rtol=1e-5, atol=1e-7)
    assert a["mask"].sum() != b["mask"].sum()  # else the check above could not tell norm from own count


def _count(rec, agg):
    m = rec["mask"]
    return m.sum() if agg == "token-mean" else m.any(-1).sum()


def test_config_defaults_follow_the_paper(tmp_path):
    cfg = RPGConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, num_generations=2,
                    per_device_train_batch_size=2)
    assert (cfg.rpg_loss, cfg.rpg_anchor, cfg.rpg_agg, cfg.rpg_dual_clip) == (
        "rpg_reinforce_ufkl", "rollout", "token-mean", 10.0)
    assert (cfg.beta, cfg.epsilon, cfg.epsilon_high, cfg.scale_rewards) == (1e-4, 0.2, 0.28, "none")


@pytest.mark.parametrize("field,value,needle", [
    ("rpg_loss", "rpg_kl", "rpg_reinforce_ufkl"),
    ("rpg_agg", "sum", "token-mean"),
    ("rpg_anchor", "fixed", "rollout"),
    ("rpg_dual_clip", 1.0, "> 1"),
    ("beta", -1.0, ">= 0"),
    ("loss_type", "grpo", "rpg_agg"),
    ("importance_sampling_level", "sequence", "per token"),
    ("delta", 4.0, "rpg_dual_clip"),
    ("entropy_coef", 0.01, "entropy"),
    ("sync_ref_model", True, "rpg_anchor='reference'"),
    ("rpg_kl_in_advantage", True, "rpg_rkl"),  # the default REINFORCE loss has no such option
    # options that bypass _compute_loss or would be silently ignored by it
    ("use_liger_kernel", True, "compute_liger_loss"),
    ("use_bias_correction_kl", False, "rpg_loss='grpo'"),
])
def test_config_rejects_with_named_field(tmp_path, field, value, needle):
    with pytest.raises(ValueError, match=f"RPGConfig.{field}=") as err:
        RPGConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, num_generations=2,
                  per_device_train_batch_size=2, **{field: value})
    assert needle in str(err.value)


def test_config_rejects_unknown_vllm_importance_sampling_mode(tmp_path):
    with pytest.raises(ValueError, match="RPGConfig.vllm_importance_sampling_mode='seq'") as err:
        RPGConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, num_generations=2,
                  per_device_train_batch_size=2, use_vllm=True, vllm_importance_sampling_mode="seq")
    assert "sequence_mask" in str(err.value)


def test_trainer_revalidates_fields_set_after_construction(tiny_dir, tmp_path):
    """use_liger_kernel set on the args after RPGConfig() must not reach TRL."""
    args = RPGConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, num_generations=2,
                     per_device_train_batch_size=2)
    args.use_liger_kernel = True
    with pytest.raises(ValueError, match="RPGConfig.use_liger_kernel=True"):
        RPGTrainer(model=str(tiny_dir), reward_funcs=prefix_rank, args=args, train_dataset=_dataset())


def test_trainer_requires_rpg_config(tiny_dir, tmp_path):
    from trl import GRPOConfig

    args = GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, num_generations=2,
                      per_device_train_batch_size=2)
    with pytest.raises(TypeError, match="RPGConfig"):
        RPGTrainer(model=str(tiny_dir), reward_funcs=prefix_rank, args=args, train_dataset=_dataset())


def test_rpg_norm_is_the_step_share_of_the_global_count():
    # 100 tokens over 2 processes; 8 micro-batches per generation, 4 per optimizer step.
    assert rpg_norm(100, 2, 4, 8, training=True) == 25.0
    assert rpg_norm(100, 2, 4, 8, training=False) == 50.0
    assert rpg_norm(0, 1, 1, 1, training=True) == 1.0
