"""RPGTrainer vs TRL's own GRPOTrainer loss on identical inputs: the vLLM correction r and
TRL's other per-token multipliers.

Both trainers are real (same tiny Qwen2 loaded from disk); each ``_compute_loss`` runs on the
same hand-built batch (fixed w = pi_theta/pi_old per sequence, fixed r as TRL's
``vllm_importance_sampling_mode`` produces it), and we compare d loss / d logp per token,
captured from the log-probs the trainer's own forward returns. The end-to-end test lets TRL
form r itself, in every ``vllm_importance_sampling_mode``, from a real second sampler passed as
TRL's ``rollout_func``. vLLM itself is not installed: the trainers get ``use_vllm=True`` only
after construction (TRL reads it in the loss and, with a rollout_func, only to decide whether
to sync vLLM's weights).
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
from rpgrl.integrations.verl_cpu.reward import compute_score as toy_score  # noqa: E402
from rpgrl.losses import LOSSES, policy_loss  # noqa: E402
from rpgrl.models.tiny import build_tiny_tokenizer  # noqa: E402

B, P, T = 4, 3, 5  # sequences, prompt tokens, completion tokens
ADV = [1.0, 1.0, -1.0, -1.0]
R_SEQ = [1.0, 1.5, 0.7, 2.5]  # docs/trl.md's worked example: kept by sequence_mask (cap 3)
# Off-policy w per sequence: seq 0 w > 1+eps_high with A > 0 and seq 3 w < 1-eps with A < 0
# (clipped by w alone); seqs 1, 2 inside the trust region although w*r is not (1.65, 0.63).
W_OFF = [1.35, 1.1, 0.9, 0.7]


def reward(completions, **_):
    return [0.0] * len(completions)


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
    loss, grad = _loss_and_grad(trainer, lambda: trainer._compute_loss(trainer.model, inputs))
    return loss.detach(), grad


def _loss_and_grad(trainer, compute):
    """Run ``compute()`` (a loss) and differentiate it w.r.t. the log-probs the trainer's
    ``_get_per_token_logps_and_entropies`` returned inside it (parameters untouched)."""
    seen = []
    forward = trainer._get_per_token_logps_and_entropies

    def capture(*a, **kw):
        logp, ent, aux = forward(*a, **kw)
        if logp.requires_grad:
            seen.append(logp)
        return logp, ent, aux

    trainer._get_per_token_logps_and_entropies = capture
    try:
        loss = compute()
    finally:
        del trainer._get_per_token_logps_and_entropies
    assert len(seen) == 1
    (grad,) = torch.autograd.grad(loss, seen[0], retain_graph=True)
    return loss, grad


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
    """docs/trl.md's worked example: r = [1, 1.5, 0.7, 2.5], A = [1, 1, -1, -1], w = 1: TRL's per-sequence
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


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_policy_loss_weights_scale_each_token_gradient(name):
    """policy_loss(weights=q): every loss's token gradient is q times the unweighted one (w, the
    clip and the count untouched), for [B, T] and [B, 1] weights; bad shapes are refused."""
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 4, generator=g, dtype=torch.float64) - 0.1
    base = old + 0.3 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)

    def grad(weights):
        lp = base.clone().requires_grad_(True)
        loss, _ = policy_loss(name, lp, old, adv, mask, beta=0.1, weights=weights)
        loss.backward()
        return lp.grad

    for q in (torch.rand(3, 4, generator=g, dtype=torch.float64) * 2, torch.tensor([[0.5], [0.0], [2.0]])):
        assert torch.allclose(grad(q), q.expand(3, 4).double() * grad(None), rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="weights shape"):
        grad(torch.ones(3))


def test_token_weights_product_and_shapes():
    like = torch.zeros(2, 3, dtype=torch.float64)
    assert token_weights(like) is None and token_weights(like, None, None) is None
    r = torch.tensor([[2.0], [0.0]])
    ent = torch.tensor([[True, False, True], [True, True, True]])
    w = token_weights(like, r, ent, None)
    assert w.dtype == torch.float64 and w.shape == (2, 3)
    assert w.tolist() == [[2.0, 0.0, 2.0], [0.0, 0.0, 0.0]]
    assert not math.isnan(w.sum().item())


# -- end to end: TRL computes r itself from a sampler that is not the trainer ------------------


class _Sampler:
    """A real second policy standing in for vLLM: the trainer's weights with a perturbed LM
    head (vLLM's numerics differ from the trainer's the same way, only less). It samples the
    completions and reports its own log-probs of them, as vLLM does."""

    def __init__(self, path, scale: float):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            head = self.model.get_output_embeddings().weight
            head.add_(scale * head.std() * torch.randn(head.shape, generator=g))

    def __call__(self, prompts, trainer):
        tok = trainer.processing_class
        prompt_ids = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
                      for p in prompts]
        completion_ids, logprobs = [], []
        for ids in prompt_ids:
            x = torch.tensor([ids])
            with torch.no_grad():
                out = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, max_new_tokens=T,
                                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                          output_scores=True, return_dict_in_generate=True, temperature=1.0,
                                          top_k=0, top_p=1.0)
            new = out.sequences[0, x.size(1):]
            lps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, new)]
            completion_ids.append(new.tolist())
            logprobs.append(lps)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}


class _VersusTRL(RPGTrainer):
    """Every micro-batch: RPG's loss and TRL's own GRPOTrainer._compute_loss on the same inputs
    and model, with d loss / d logp for both."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.records = []

    def _compute_loss(self, model, inputs):
        ours, our_grad = _loss_and_grad(self, lambda: super(_VersusTRL, self)._compute_loss(model, inputs))
        theirs, their_grad = _loss_and_grad(self, lambda: GRPOTrainer._compute_loss(self, model, inputs))
        self.records.append({"rpg": ours.detach(), "trl": theirs.detach(), "rpg_grad": our_grad,
                             "trl_grad": their_grad, "r": inputs["importance_sampling_ratio"].clone(),
                             "mask": inputs["completion_mask"].bool()})
        return ours


def prefix_rank(completions, **_):
    """Ties only completions with a common 4-token prefix, so every group has advantages
    whatever is drawn (tests/informative.py; the share of digits tied a group of 4 with probability
    ~1.5e-3)."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [toy_score("rpgrl/add", t, "") for t in texts]


SAMPLER_NOISE = 2.0  # LM-head noise, in units of the head's weight std
#: 16 prompts x 4 samples per generation (2 optimizer steps of 32), so that whatever is drawn
#: some ratios fall outside the mode's bounds and some inside: log r of the sampled sequences
#: spans about -2..1.8 with ~30 % outside (0.4, 2.5), of the tokens -1.1..0.8 with ~7 % outside
#: (0.5, 2) (4 seeds). With 8 samples (~36 tokens) no token was outside with probability of a few %.
IS_PAIRS = [(a, b) for a in (3, 14, 25, 36) for b in (7, 18, 29, 40)]


@pytest.mark.medium
@pytest.mark.parametrize("mode,clip", [("sequence_mask", (0.4, 2.5)), ("sequence_truncate", (0.4, 2.5)),
                                       ("token_mask", (0.5, 2.0)), ("token_truncate", (0.5, 2.0))])
def test_trl_computed_ratio_matches_trl_loss_end_to_end(tiny_dir, tmp_path, mode, clip):
    """TRL forms r from a real second sampler in every vllm_importance_sampling_mode; on both
    optimizer steps of a generation (the second off-policy) RPG's loss and per-token gradient
    equal TRL's own GRPOTrainer loss (rpg_loss='ppo', beta = 0, no dual clip)."""
    torch.manual_seed(0)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{a}+{b}"}]} for a, b in IS_PAIRS])
    args = RPGConfig(**_kw(tmp_path, rpg_loss="ppo", rpg_dual_clip=None, max_steps=2, steps_per_generation=2,
                           num_generations=4, per_device_train_batch_size=32, learning_rate=5e-2, logging_steps=1,
                           save_strategy="no", seed=0, vllm_importance_sampling_mode=mode,
                           vllm_importance_sampling_clip_min=clip[0], vllm_importance_sampling_clip_max=clip[1]))
    trainer = _VersusTRL(model=str(tiny_dir), reward_funcs=prefix_rank, args=args, train_dataset=ds,
                         processing_class=build_tiny_tokenizer(), rollout_func=_Sampler(tiny_dir, SAMPLER_NOISE))
    trainer.use_vllm = True  # what use_vllm=True sets; the rollout_func is the sampler
    trainer._last_loaded_step = 0  # one generation at step 0: no weight sync to a vLLM engine
    trainer.train()
    recs = trainer.records
    assert len(recs) == 2
    for rec in recs:
        assert torch.allclose(rec["rpg"], rec["trl"], rtol=1e-5, atol=1e-7), (mode, rec["rpg"], rec["trl"])
        assert torch.allclose(rec["rpg_grad"], rec["trl_grad"], rtol=1e-5, atol=1e-8), mode
    # TRL's r really varies, in the mode's shape, and hits the mode's bound (masked or truncated)
    assert all((rec["r"].shape[1] == 1) == mode.startswith("sequence") for rec in recs)
    r = torch.cat([rec["r"].expand_as(rec["mask"])[rec["mask"]] for rec in recs])
    assert (r != 1).any()
    if mode.endswith("mask"):
        assert (r == 0).any() and (r > 0).any(), r
    else:
        assert ((r == clip[0]) | (r == clip[1])).any() and (r > 0).all(), r
    assert all(rec["rpg_grad"].abs().max() > 0 for rec in recs)
