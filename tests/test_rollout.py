"""rpgrl's sampler (rollout.generate, engine="rpgrl") against HF generate and against the
policy it must draw from: softmax(logits / temperature) [top-p], nothing else."""

from __future__ import annotations

import math

import pytest
import torch
from hf_tiny import ARCHS, tiny_causal_lm

from rpgrl.models.logprobs import sequence_logprobs
import torch.nn.functional as F

from rpgrl.loop.generation import RolloutBatch, _decode, generate, left_pad, sample_tokens
from rpgrl.models.tiny import build_tiny_tokenizer

TOK = build_tiny_tokenizer()
PROMPTS = [[5, 6, 7], [8, 9], [5, 6, 7], [10, 11, 12, 13], [14]]  # different lengths, one repeated


def _model(arch: str, seed: int = 0):
    model = tiny_causal_lm(arch, seed=seed, vocab_size=len(TOK))
    # A second EOS the random model emits often, so rows stop at different steps.
    probe = generate(model, TOK, PROMPTS, max_new_tokens=6, temperature=0.0, engine="hf")
    model.generation_config.eos_token_id = [TOK.eos_token_id, int(probe.response_ids[0, 2])]
    return model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n", [1, 3])
def test_greedy_matches_hf_generate_token_for_token(arch, n):
    model = _model(arch)
    ours = generate(model, TOK, PROMPTS, n=n, max_new_tokens=7, temperature=0.0, engine="rpgrl")
    hf = generate(model, TOK, PROMPTS, n=n, max_new_tokens=7, temperature=0.0, engine="hf")
    assert torch.equal(ours.input_ids, hf.input_ids)
    assert torch.equal(ours.response_mask, hf.response_mask)
    assert torch.equal(ours.truncated, hf.truncated) and ours.responses == hf.responses
    lengths = ours.response_lengths.tolist()
    assert len(set(lengths)) > 1 and min(lengths) <= 3  # rows stop at different steps


def test_model_generation_defaults_do_not_change_the_sampler():
    """Qwen-Instruct ships repetition_penalty / top_k in generation_config; neither engine may apply them."""
    model = _model("qwen2")
    plain = generate(model, TOK, PROMPTS, max_new_tokens=7, temperature=0.0, engine="rpgrl")
    model.generation_config.repetition_penalty = 10.0
    model.generation_config.top_k = 2
    for engine in ("rpgrl", "hf"):
        out = generate(model, TOK, PROMPTS, max_new_tokens=7, temperature=0.0, engine=engine)
        assert torch.equal(out.input_ids, plain.input_ids), engine


def test_dropping_finished_rows_changes_nothing(monkeypatch):
    from transformers import DynamicCache

    model = _model("llama")
    ids, mask = left_pad([p for p in PROMPTS for _ in range(1)], TOK.pad_token_id)
    eos = torch.tensor(model.generation_config.eos_token_id)
    common = dict(max_new_tokens=7, temperature=0.0, top_p=1.0, eos_ids=eos, pad_id=TOK.pad_token_id)
    calls = []
    original = DynamicCache.batch_select_indices
    monkeypatch.setattr(DynamicCache, "batch_select_indices",
                        lambda self, idx: (calls.append(len(idx)), original(self, idx))[1])
    never, _, _ = _decode(model, ids, mask, 3, compact_at=2.0, **common)
    assert calls == []
    always, _, _ = _decode(model, ids, mask, 3, compact_at=0.0, **common)
    assert calls and calls == sorted(calls, reverse=True)  # the live batch only shrinks
    assert torch.equal(never, always)


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prefix_prefill_draws_the_same(arch):
    """Prompts with a common prefix (a chat template's system prompt) prefill it once
    (generation._shared_columns): in float64 the same tokens, log-probs and entropies as
    prefilling every prompt whole; a left-padded block shares nothing."""
    from rpgrl.loop.generation import _shared_columns

    model = _model(arch).double()
    system = [5, 6, 7, 8, 9, 10]
    ids, mask = left_pad([system + [11, 12], system + [13, 14], system + [12, 11]], TOK.pad_token_id)
    assert _shared_columns(ids, mask) == len(system)
    padded, pmask = left_pad([system + [11], system + [13, 14]], TOK.pad_token_id)
    assert _shared_columns(padded, pmask) == 0 and _shared_columns(ids[:1], mask[:1]) == 0
    eos = torch.tensor(model.generation_config.eos_token_id)
    common = dict(max_new_tokens=6, temperature=0.7, top_p=1.0, eos_ids=eos, pad_id=TOK.pad_token_id,
                  with_scores=True)
    runs = []
    for share in (True, False):
        torch.manual_seed(3)
        runs.append(_decode(model, ids, mask, 4, share_prefix=share, **common))
    (tok_a, lp_a, ent_a), (tok_b, lp_b, ent_b) = runs
    assert torch.equal(tok_a, tok_b)
    torch.testing.assert_close(lp_a, lp_b, rtol=0, atol=1e-10)
    torch.testing.assert_close(ent_a, ent_b, rtol=0, atol=1e-10)


def _expected(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """By hand: softmax(l / T), keep the smallest top set with mass >= top_p, renormalise."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = p.argsort(descending=True)
    keep, mass = [], 0.0
    for i in order.tolist():
        keep.append(i)
        mass += float(p[i])
        if mass >= top_p:
            break
    q = torch.zeros_like(p)
    q[keep] = p[keep]
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_p,nucleus_k", [(1.0, 1.0, 1024), (0.7, 1.0, 1024), (1.3, 0.6, 1024),
                                                         (1.3, 0.6, 3), (1.3, 0.6, 1)])
def test_sample_tokens_draws_from_the_tempered_nucleus(temperature, top_p, nucleus_k):
    """nucleus_k 3: the top 3 hold the 0.6 nucleus (top-k path); 1: they do not (full sort)."""
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 200_000
    draws = sample_tokens(logits.expand(n, -1), temperature, top_p, nucleus_k=nucleus_k)
    freq = torch.bincount(draws, minlength=6).double() / n
    want = _expected(logits, temperature, top_p)
    se = torch.sqrt(want * (1 - want) / n).clamp(min=1e-12)
    assert ((freq - want).abs() <= 5 * se + 1e-12).all(), (freq, want)
    assert (freq[want == 0] == 0).all()  # outside the nucleus: never drawn
    if top_p < 1:
        assert (want == 0).sum() >= 2  # the case really truncates


def test_sample_tokens_greedy_is_argmax():
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_tokens(logits, 0.0), logits.argmax(-1))


def test_first_token_of_n_samples_follows_the_models_tempered_softmax():
    """The prompt is prefilled once and its logits repeated for the n samples."""
    model = _model("qwen2")
    prompt, tau, n = [5, 6, 7], 0.8, 20_000
    torch.manual_seed(1)
    out = generate(model, TOK, [prompt], n=n, max_new_tokens=1, temperature=tau, engine="rpgrl")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    want = torch.softmax(logits.double() / tau, -1)
    freq = torch.bincount(out.response_ids[:, 0], minlength=want.numel()).double() / n
    se = torch.sqrt(want * (1 - want) / n)
    assert ((freq - want).abs() <= 5 * se + 1e-9).all()
    assert float(want.max()) < 0.9  # a real spread of outcomes, not one forced token


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_sampler_logprobs_equal_the_loss_side_logprobs(arch, monkeypatch):
    """What the loop samples from at each step is what sequence_logprobs scores (same tau)."""
    import rpgrl.loop.generation as rollout

    model = _model(arch)
    tau = 0.7
    seen: list[torch.Tensor] = []
    original = rollout.sample_tokens

    def recording(logits, temperature, top_p=1.0):
        tok = original(logits, temperature, top_p)
        seen.append(torch.log_softmax(logits.double() / temperature, -1).gather(1, tok[:, None]).squeeze(1))
        return tok

    monkeypatch.setattr(rollout, "sample_tokens", recording)
    monkeypatch.setattr(rollout, "_decode", lambda *a, **k: _decode(*a, **{**k, "compact_at": 2.0}))
    torch.manual_seed(2)
    out = generate(model, TOK, PROMPTS, n=4, max_new_tokens=6, temperature=tau, engine="rpgrl")
    sampler = torch.stack(seen, 1).float()[:, : out.response_mask.shape[1]] * out.response_mask
    lp, _ = sequence_logprobs(model, out.input_ids, out.attention_mask, out.prompt_len, temperature=tau)
    torch.testing.assert_close(lp, sampler, rtol=0, atol=1e-5)
    assert out.response_mask.sum() > 20 and lp.min() < math.log(0.5)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
def test_generation_logprobs_are_pi_olds(arch, top_p):
    """``with_logprobs``: each response token's log-prob and entropy, taken from the logits it was
    drawn from, are sequence_logprobs' (the trainer's pi_old pass) -- in float64 to round-off,
    with rows finishing at different steps (compaction) and under top-p (scored with the full
    softmax, like the pass); greedy decoding and HF generate return none."""
    model = _model(arch).double()
    tau = 0.7
    torch.manual_seed(3)
    out = generate(model, TOK, PROMPTS, n=3, max_new_tokens=6, temperature=tau, top_p=top_p, engine="rpgrl",
                   with_logprobs=True)
    lp, ent = sequence_logprobs(model, out.input_ids, out.attention_mask, out.prompt_len, temperature=tau,
                                with_entropy=True)
    assert out.logprobs.shape == lp.shape and out.logprobs.dtype == torch.float32  # stored like the pass's
    torch.testing.assert_close(out.logprobs.double(), lp, rtol=0, atol=1e-6)  # float32 storage
    torch.testing.assert_close(out.entropy.double(), ent, rtol=0, atol=1e-5)
    assert len(set(out.response_lengths.tolist())) > 1 and (out.logprobs * (1 - out.response_mask)).abs().max() == 0
    picked = out.select([4, 0, 2])
    torch.testing.assert_close(picked.logprobs, out.logprobs[[4, 0, 2]], rtol=0, atol=0)
    short = generate(model, TOK, PROMPTS[:2], n=1, max_new_tokens=2, temperature=tau, with_logprobs=True)
    both = RolloutBatch.concat([picked, short])  # dynamic sampling's rounds: right-padded with zeros
    torch.testing.assert_close(both.logprobs, torch.cat([picked.logprobs, F.pad(short.logprobs, (0, 4))]),
                               rtol=0, atol=0)
    assert RolloutBatch.concat([picked, generate(model, TOK, PROMPTS[:1], max_new_tokens=2, temperature=tau)]
                               ).logprobs is None  # a round without them: none (the pass runs)
    assert generate(model, TOK, PROMPTS, max_new_tokens=6, temperature=0.0, with_logprobs=True).logprobs is None
    assert generate(model, TOK, PROMPTS, max_new_tokens=6, temperature=tau, engine="hf",
                    with_logprobs=True).logprobs is None


def test_sampling_with_scores_draws_what_sample_tokens_draws():
    """The fused path (sampling + pi_old's scores from one exp) takes the same tokens from the
    same random numbers as sample_tokens, and its scores are token_scores'."""
    from rpgrl.loop.generation import sample_with_scores, token_scores

    logits = torch.randn(16, 500, generator=torch.Generator().manual_seed(0)) * 4
    for tau in (1.0, 0.6):
        torch.manual_seed(7)
        want = sample_tokens(logits, tau)
        torch.manual_seed(7)
        got, lp, ent = sample_with_scores(logits, tau)
        assert torch.equal(got, want)
        lp_ref, ent_ref = token_scores(logits.double(), got, tau)
        torch.testing.assert_close(lp, lp_ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(ent, ent_ref, rtol=0, atol=1e-5)
        assert ent.min() > 0 and lp.max() <= 0


def test_lora_model_samples_with_its_adapters():
    peft = pytest.importorskip("peft")
    base = _model("qwen2")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(base, cfg)
    ours = generate(lora, TOK, PROMPTS, n=2, max_new_tokens=6, temperature=0.0, engine="rpgrl")
    hf = generate(lora, TOK, PROMPTS, n=2, max_new_tokens=6, temperature=0.0, engine="hf")
    assert torch.equal(ours.input_ids, hf.input_ids)
    with lora.disable_adapter():
        plain = generate(lora, TOK, PROMPTS, n=2, max_new_tokens=6, temperature=0.0, engine="rpgrl")
    assert not torch.equal(plain.input_ids, ours.input_ids)


def test_engine_is_validated():
    with pytest.raises(ValueError, match="engine"):
        generate(_model("qwen2"), TOK, PROMPTS, max_new_tokens=2, engine="vllm")


def test_sample_tokens_mixes_top_k_and_full_sort_rows():
    """Rows whose nucleus fits in the top k and rows that need the full sort, in one batch."""
    torch.manual_seed(4)
    peaked = torch.tensor([4.0, 3.0, 0.0, -1.0, -2.0, -3.0])  # top 2 hold > 0.9
    flat = torch.tensor([0.3, 0.2, 0.1, 0.0, -0.1, -0.2])  # the 0.9 nucleus needs 6
    n = 100_000
    draws = sample_tokens(torch.stack([peaked, flat]).repeat(n, 1), 1.0, 0.9, nucleus_k=2).view(n, 2)
    for col, logits in enumerate((peaked, flat)):
        freq = torch.bincount(draws[:, col], minlength=6).double() / n
        want = _expected(logits, 1.0, 0.9)
        se = torch.sqrt(want * (1 - want) / n).clamp(min=1e-12)
        assert ((freq - want).abs() <= 5 * se + 1e-12).all(), (col, freq, want)
    assert (draws[:, 0] < 2).all() and (draws[:, 1] == 5).any()


def test_generation_never_forms_logits_beyond_the_last_position():
    """Memory: the prefill asks the LM head for the last position only and every
    decode step feeds one token, so no [batch, length, vocab] logits exist during sampling."""
    model = _model("qwen2")
    shapes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    out = generate(model, TOK, PROMPTS, n=3, max_new_tokens=6, temperature=1.0, engine="rpgrl")
    handle.remove()
    assert len(shapes) >= 2 and out.response_mask.shape[1] >= 2
    assert all(s[1] == 1 for s in shapes), shapes  # [rows, 1, V] only
