"""RPGTrainer vs TRL's own GRPOTrainer loss on identical inputs: the vLLM correction r and
TRL's other per-token multipliers (issue 13, items 1-2).

Both trainers are real (same tiny Qwen2 loaded from disk); each ``_compute_loss`` runs on the
same hand-built batch (fixed w = pi_theta/pi_old per sequence, fixed r as TRL's
``vllm_importance_sampling_mode`` produces it), and we compare d loss / d logp per token,
captured from the log-probs the trainer's own forward returns. vLLM itself is not installed:
the trainers get ``use_vllm=True`` only after construction (TRL reads it in the loss and in
generation, which these tests do not run).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl", exc_type=ImportError, reason="TRL not installed")
pytest.importorskip("datasets", reason="datasets (a TRL dependency) is not installed")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rpgrl.integrations.trl import RPGConfig, RPGTrainer, token_weights  # noqa: E402
from rpgrl.tiny import TinyModelConfig, build_tiny_model, build_tiny_tokenizer  # noqa: E402

B, P, T = 4, 3, 5  # sequences, prompt tokens, completion tokens
ADV = [1.0, 1.0, -1.0, -1.0]
R_SEQ = [1.0, 1.5, 0.7, 2.5]  # the issue's example: kept by sequence_mask (cap 3)
# Off-policy w per sequence: seq 0 w > 1+eps_high with A > 0 and seq 3 w < 1-eps with A < 0
# (clipped by w alone); seqs 1, 2 inside the trust region although w*r is not (1.65, 0.63).
W_OFF = [1.35, 1.1, 0.9, 0.7]


def reward(completions, **_):
    return [0.0] * len(completions)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
    path = tmp_path_factory.mktemp("tiny-is")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _kw(tmp_path, **overrides):
    kw = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, num_generations=2,
              per_device_train_batch_size=B, max_completion_length=T, epsilon=0.2, epsilon_high=0.28, beta=0.0)
    kw.update(overrides)
    return kw


def _trainer(cls, cfg_cls, tiny_dir, tmp_path, **overrides):
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": "1+2"}]}] * B)
    trainer = cls(model=str(tiny_dir), reward_funcs=reward, args=cfg_cls(**_kw(tmp_path, **overrides)),
                  train_dataset=ds, processing_class=build_tiny_tokenizer())
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what the training loop sets for GA = 1
    return trainer


@pytest.fixture(scope="module")
def make(tiny_dir, tmp_path_factory):
    """Trainers are built once per (class, config) for the module: a few seconds each."""
    cache = {}

    def get(cls, **overrides):
        key = (cls.__name__, tuple(sorted(overrides.items())))
        if key not in cache:
            cfg_cls = RPGConfig if cls is RPGTrainer else GRPOConfig
            cache[key] = _trainer(cls, cfg_cls, tiny_dir, tmp_path_factory.mktemp("t"), **overrides)
        trainer = cache[key]
        trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
        if cls is RPGTrainer:
            trainer.rpg_beta = float(trainer.args.beta)
        return trainer

    return get


@pytest.fixture(scope="module")
def trl_dapo(make):
    return make(GRPOTrainer)


def _inputs(trainer, w, r, adv=ADV, **extra):
    """A batch whose old log-probs make w = exp(logp - old) exactly ``w`` per sequence."""
    g = torch.Generator().manual_seed(0)
    vocab = trainer.model.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (B, P), generator=g)
    completion_ids = torch.randint(3, vocab, (B, T), generator=g)
    ones_p, ones_c = torch.ones(B, P, dtype=torch.long), torch.ones(B, T, dtype=torch.long)
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([ones_p, ones_c], 1), T)
    old = logp - torch.log(torch.tensor(w, dtype=logp.dtype))[:, None]
    out = {"prompt_ids": prompt_ids, "prompt_mask": ones_p, "completion_ids": completion_ids,
           "completion_mask": ones_c, "advantages": torch.tensor(adv), "old_per_token_logps": old,
           "num_items_in_batch": torch.tensor(float(B * T)), "rpg_num_seqs_in_batch": torch.tensor(B)}
    if r is not None:
        out["importance_sampling_ratio"] = r
    out.update(extra)
    return out


def _loss_and_logp_grad(trainer, inputs):
    """The trainer's own ``_compute_loss`` and d loss / d logp from the log-probs its forward returns."""
    seen = []
    forward = trainer._get_per_token_logps_and_entropies

    def capture(*a, **kw):
        logp, ent, aux = forward(*a, **kw)
        if logp.requires_grad:
            logp.retain_grad()
            seen.append(logp)
        return logp, ent, aux

    trainer._get_per_token_logps_and_entropies = capture
    try:
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
    finally:
        del trainer._get_per_token_logps_and_entropies
        trainer.model.zero_grad(set_to_none=True)
    assert len(seen) == 1
    return loss.detach(), seen[0].grad


def _r_seq():
    return torch.tensor(R_SEQ)[:, None]  # sequence_* modes: one ratio per sequence, [B, 1]


def _r_token():
    """token_* modes: [B, T]; zeros are tokens TRL's token_mask drops, the rest in (0, 3]."""
    g = torch.Generator().manual_seed(1)
    r = torch.exp(0.5 * torch.randn(B, T, generator=g)).clamp(max=3.0)
    r[0, 1] = r[2, 3] = r[3, 0] = 0.0
    return r


@pytest.mark.parametrize("rpg_loss", ["rpg_reinforce_ufkl", "ppo"])
def test_issue_example_matches_trl_sequence_ratio(trl_dapo, make, rpg_loss):
    """Issue 13 item 2: r = [1, 1.5, 0.7, 2.5], A = [1, 1, -1, -1], w = 1: TRL's per-sequence
    gradient sums are -r*A*T = [-5, -7.5, 3.5, 12.5] (token-mean over 20 tokens, x 20); the old
    fold of r into the sampler clipped w*r and gave [-5, 0, 0, 12.5]."""
    rpg = make(RPGTrainer, rpg_loss=rpg_loss)
    inputs = _inputs(trl_dapo, [1.0] * B, _r_seq())
    trl_loss, trl_grad = _loss_and_logp_grad(trl_dapo, inputs)
    rpg_loss_value, rpg_grad = _loss_and_logp_grad(rpg, inputs)
    per_seq = (rpg_grad * B * T).sum(-1)
    assert torch.allclose(per_seq, torch.tensor([-5.0, -7.5, 3.5, 12.5]), atol=1e-5), per_seq
    assert torch.allclose(rpg_grad, trl_grad, rtol=1e-5, atol=1e-8)
    if rpg_loss == "ppo":  # same surrogate as TRL's "dapo" loss: equal values too
        assert torch.allclose(rpg_loss_value, trl_loss, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["sequence", "token"])
@pytest.mark.parametrize("rpg_loss", ["rpg_reinforce_ufkl", "ppo"])
def test_off_policy_trust_region_acts_on_w_not_w_times_r(trl_dapo, make, mode, rpg_loss):
    """Off-policy (w != 1), beta = 0: RPG's token gradients equal TRL's for both shapes of r
    (sequence_*: [B, 1]; token_*: [B, T] with masked zeros). Expected -r*w*A/20 inside the
    clip range of w alone, 0 outside it."""
    rpg = make(RPGTrainer, rpg_loss=rpg_loss)
    r = _r_seq() if mode == "sequence" else _r_token()
    inputs = _inputs(trl_dapo, W_OFF, r)
    _, trl_grad = _loss_and_logp_grad(trl_dapo, inputs)
    _, rpg_grad = _loss_and_logp_grad(rpg, inputs)
    w, a = torch.tensor(W_OFF)[:, None], torch.tensor(ADV)[:, None]
    inside = ((a > 0) & (w < 1.28)) | ((a < 0) & (w > 0.8))
    expected = torch.where(inside, -r * w * a, 0.0).expand(B, T) / (B * T)
    assert torch.allclose(rpg_grad, expected, rtol=1e-4, atol=1e-7), (rpg_grad * B * T, expected * B * T)
    assert torch.allclose(rpg_grad, trl_grad, rtol=1e-5, atol=1e-8)
    # the sequences the old w*r clip zeroed get gradient wherever TRL's r keeps the token
    assert ((rpg_grad[1:3] != 0) == (r.expand(B, T)[1:3] != 0)).all()


@pytest.mark.parametrize("rpg_loss", ["rpg_reinforce_ufkl", "rpg_rkl", "rpg_urkl"])
@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_beta_positive_r_scales_the_whole_rpg_token_loss(make, rpg_loss, mode):
    """beta > 0: the KL term and the clip see w (pi_old stays the anchor), and r multiplies the
    token's whole gradient: grad with r == r * grad of the same batch without vLLM."""
    rpg = make(RPGTrainer, rpg_loss=rpg_loss, beta=0.1)
    r = _r_seq() if mode == "sequence" else _r_token()
    inputs = _inputs(rpg, W_OFF, r)
    _, with_r = _loss_and_logp_grad(rpg, inputs)
    rpg.use_vllm = False  # the same batch as if the trainer had sampled it: no correction
    _, without = _loss_and_logp_grad(rpg, inputs)
    assert torch.allclose(with_r, r * without, rtol=1e-5, atol=1e-9)
    # the KL term is really in there: beta changes the in-region gradient
    rpg.use_vllm, rpg.rpg_beta = True, 0.0  # (the fixture restores both)
    _, no_kl = _loss_and_logp_grad(rpg, inputs)
    assert not torch.allclose(no_kl[1], with_r[1], rtol=1e-3, atol=0)


def test_entropy_and_off_policy_masks_match_trl_with_seq_mean(make):
    """top_entropy_quantile and off_policy_mask_threshold multiply the token loss as in TRL:
    masked tokens still count in each sequence's length (TRL loss_type='grpo' ==
    rpg_agg='seq-mean-token-mean' with rpg_loss='ppo', beta = 0), together with r."""
    common = dict(top_entropy_quantile=0.5, off_policy_mask_threshold=0.05)
    trl = make(GRPOTrainer, loss_type="grpo", **common)
    rpg = make(RPGTrainer, rpg_loss="ppo", rpg_agg="seq-mean-token-mean", **common)
    inputs = _inputs(trl, W_OFF, _r_token())
    trl_loss, trl_grad = _loss_and_logp_grad(trl, inputs)
    rpg_loss, rpg_grad = _loss_and_logp_grad(rpg, inputs)
    assert torch.allclose(rpg_loss, trl_loss, rtol=1e-5, atol=1e-7)
    assert torch.allclose(rpg_grad, trl_grad, rtol=1e-5, atol=1e-8)
    zero = rpg_grad == 0
    assert zero.any() and not zero.all()  # the masks really removed some tokens, not all


def test_token_weights_product_and_shapes():
    like = torch.zeros(2, 3, dtype=torch.float64)
    assert token_weights(like) is None and token_weights(like, None, None) is None
    r = torch.tensor([[2.0], [0.0]])
    ent = torch.tensor([[True, False, True], [True, True, True]])
    w = token_weights(like, r, ent, None)
    assert w.dtype == torch.float64 and w.shape == (2, 3)
    assert w.tolist() == [[2.0, 0.0, 2.0], [0.0, 0.0, 0.0]]
    assert not math.isnan(w.sum().item())
