"""Shared prompts (rpgrl.models.prefix): each distinct prompt runs once, and nothing changes.

The claim is exactness: log-probs, entropies and gradients of every parameter equal the
padded forward's, for rotary (Qwen2, Llama), absolute-position (GPT-2) and sliding-window
(Mistral) attention, with left-padded prompts of different lengths and right-padded
responses. float64 makes "equal" mean round-off: 1e-10 for values and for GPT-2's
gradients. HF's RMSNorm computes in float32 even in a float64 model, and the shared path
sums a prompt's n upstream gradients *before* that float32 backward (the padded path
after), so RMSNorm models' gradients agree to float32 round-off (1e-6 of the largest
entry; observed ~1e-7); a wrong or missing gradient path would be off by O(1).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hf_tiny import ARCHS, tiny_causal_lm

from rpgrl.models import prefix
from rpgrl.models.logprobs import sequence_logprobs
from rpgrl.models.packing import can_pack

P = 5


def _group_batch():
    """3 distinct prompts (2 left-padded) x 3 responses of different lengths, plus one lone prompt."""
    prompts = [([0, 0, 7, 8, 9], [0, 0, 1, 1, 1]), ([3, 4, 5, 6, 7], [1, 1, 1, 1, 1]),
               ([0, 11, 12, 13, 14], [0, 1, 1, 1, 1])]
    responses = [[10, 11, 12, 1, 0], [13, 1, 0, 0, 0], [20, 21, 22, 23, 24],
                 [25, 26, 1, 0, 0], [27, 28, 29, 30, 1], [31, 1, 0, 0, 0]]
    ids, mask = [], []
    k = 0
    for p_ids, p_mask in prompts:
        for _ in range(3):
            r = responses[k % len(responses)]
            k += 1
            ids.append(p_ids + r)
            mask.append(p_mask + [1 if (t != 0) else 0 for t in r])
    ids.append([0, 0, 0, 40, 41] + [42, 43, 1, 0, 0])  # a prompt seen once
    mask.append([0, 0, 0, 1, 1] + [1, 1, 1, 0, 0])
    return torch.tensor(ids), torch.tensor(mask)


def _counting_decoder_calls(model):
    decoder = model.get_decoder()
    calls = []
    handle = decoder.register_forward_hook(lambda mod, args, kwargs_out: calls.append(1))
    return calls, handle


def _assert_grads_close(got, want, arch) -> int:
    """Every gradient equals its reference (float64 exact, or to 1e-6 of the largest entry for
    RMSNorm models, module doc: HF's RMSNorm computes in float32); returns how many are non-zero."""
    checked = 0
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.any()
            continue
        atol = 1e-10 if arch == "gpt2" else 1e-6 * float(w.abs().max())
        torch.testing.assert_close(g, w, rtol=0, atol=atol)
        checked += int(w.abs().sum() > 0)
    return checked


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "shared-cache"])
@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prompts_equal_padded_forward_values_and_gradients(arch, pack):
    """Both sharing paths: the packed groups (one decoder call, rpgrl.models.packing) where the
    architecture takes a 4D mask, and the shared KV cache (prompts, then the responses)."""
    model = tiny_causal_lm(arch).double()
    ids, mask = _group_batch()
    assert prefix.can_share(model)
    packable = pack and can_pack(model.get_decoder(), 32)
    assert packable == (pack and arch in ("qwen2", "llama"))  # mistral_sliding: window 3 < 32

    calls, handle = _counting_decoder_calls(model)
    lp, ent = sequence_logprobs(model, ids, mask, P, with_entropy=True, chunk_size=4, pack=pack)
    handle.remove()
    # packed: one row per distinct prompt, one call; else distinct prompts once, then every
    # response on the shared cache
    assert len(calls) == (1 if packable else 2)
    ref, ref_ent = sequence_logprobs(model, ids, mask, P, with_entropy=True, share_prompts=False)
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-10)
    assert lp.std() > 0.3 and (lp[mask[:, P:] == 0] == 0).all()

    params = list(model.parameters())
    up = torch.randn(lp.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad((sequence_logprobs(model, ids, mask, P, pack=pack)[0] * up).sum(), params,
                              allow_unused=True)
    want = torch.autograd.grad(
        (sequence_logprobs(model, ids, mask, P, share_prompts=False)[0] * up).sum(), params, allow_unused=True)
    assert _assert_grads_close(got, want, arch) >= len(params) // 2


@pytest.mark.parametrize("plan", [[[0, 1, 2, 3]], [[0, 1], [2], [3]]], ids=["one-row", "several-rows"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_packed_rows_share_the_prompts_common_prefix(arch, plan, monkeypatch):
    """Prompts that start alike (a system prompt / chat template) keep that prefix once per packed
    row; a prompt that is all prefix, shuffled groups (as in the update's micro-batches), one row
    or several (the plan is forced here; test_row_plan_weighs_the_prefix_against_attention checks
    the choice): values and gradients are still the padded forward's (float64)."""
    from rpgrl.models import packing

    monkeypatch.setattr(packing, "_plan_rows", lambda decoder, prompts, spans: plan)
    max_row = 2048 if len(plan) == 1 else 20
    model = tiny_causal_lm(arch).double()
    prompts = [([0, 5, 6, 7, 8, 9], [0, 1, 1, 1, 1, 1]), ([5, 6, 7, 20, 21, 22], [1, 1, 1, 1, 1, 1]),
               ([0, 0, 0, 0, 5, 6], [0, 0, 0, 0, 1, 1]), ([0, 0, 5, 6, 7, 30], [0, 0, 1, 1, 1, 1])]
    responses = [[10, 11, 12, 1, 0], [13, 1, 0, 0, 0], [20, 21, 22, 23, 24], [25, 26, 1, 0, 0]]
    ids, mask = [], []
    for i, (g, j) in enumerate([(0, 0), (1, 1), (2, 2), (0, 3), (3, 0), (1, 2), (2, 1), (3, 3)]):
        ids.append(prompts[g][0] + responses[j])
        mask.append(prompts[g][1] + [int(t != 0) for t in responses[j]])
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    P6 = 6
    assert packing.common_prefix([[5, 6, 7, 8, 9], [5, 6, 7, 20, 21, 22], [5, 6], [5, 6, 7, 30]]) == 2
    calls, handle = _counting_decoder_calls(model)
    seen = []
    hook = model.get_decoder().register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"].shape),
                                                         with_kwargs=True)
    lp, ent = sequence_logprobs(model, ids, mask, P6, with_entropy=True, chunk_size=4)
    handle.remove()
    hook.remove()
    assert len(calls) == 1
    rows, width = seen[0]
    # one row: the prefix [5, 6] once, the prompts' other 3 + 4 + 0 + 2 tokens, and each response
    # up to its last token but one (3 + 1 + 4 + 2 + 3 + 4 + 1 + 2; the prompt predicts the first)
    if max_row == 2048:
        assert (rows, width) == (1, 2 + 9 + 20)
    else:
        assert rows == 3
    ref, ref_ent = sequence_logprobs(model, ids, mask, P6, with_entropy=True, share_prompts=False)
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-10)
    assert lp.std() > 0.3
    params = list(model.parameters())
    up = torch.randn(lp.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad((sequence_logprobs(model, ids, mask, P6)[0] * up).sum(), params, allow_unused=True)
    want = torch.autograd.grad((sequence_logprobs(model, ids, mask, P6, share_prompts=False)[0] * up).sum(),
                               params, allow_unused=True)
    assert _assert_grads_close(got, want, arch) >= len(params) // 2


def test_row_plan_weighs_the_prefix_against_attention():
    """SmolLM2-135M's shapes (on the meta device): the study's micro-batch (8 prompts of 49 tokens
    sharing 27, ~1 response of ~12 tokens each) goes into one row; the on-policy recipe's (8
    responses of ~40 tokens per prompt) keeps a row per prompt, as a longer row's attention
    would cost more than the prefix saves; MAX_PACKED_TOKENS caps a row."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rpgrl.models import packing

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        decoder = LlamaForCausalLM(config).get_decoder()
    system = list(range(100, 127))
    prompts = [system + [200 + g] * 22 for g in range(8)]
    assert packing._plan_rows(decoder, prompts, [11] * 8) == [list(range(8))]
    assert packing._plan_rows(decoder, prompts, [8 * 39] * 8) == [[g] for g in range(8)]
    assert len(packing._plan_rows(decoder, prompts, [200] * 8)) > 1  # over 2048 tokens in one row


def test_no_repeated_prompt_runs_the_padded_forward_once():
    model = tiny_causal_lm("qwen2")
    ids, mask = _group_batch()
    rows = [0, 3, 6, 9]  # one row per prompt
    calls, handle = _counting_decoder_calls(model)
    lp, _ = sequence_logprobs(model, ids[rows], mask[rows], P)
    handle.remove()
    assert len(calls) == 1
    assert prefix.dedupe_rows(ids[rows, :P], mask[rows, :P]) is None
    full, _ = sequence_logprobs(model, ids, mask, P)
    torch.testing.assert_close(lp, full[rows], rtol=0, atol=1e-5)


def test_dedupe_rows_treats_the_mask_as_part_of_the_prompt():
    ids = torch.tensor([[0, 5, 6], [0, 5, 6], [0, 5, 6], [9, 9, 9]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]])  # row 2: same ids, pad is real
    uniq, umask, inverse = prefix.dedupe_rows(ids, mask)
    assert uniq.shape[0] == 3
    torch.testing.assert_close(uniq[inverse], ids)
    torch.testing.assert_close(umask[inverse], mask)
    assert inverse[0] == inverse[1] != inverse[2]


def test_gradient_checkpointing_falls_back_to_the_padded_forward():
    model = tiny_causal_lm("qwen2")
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    assert not prefix.can_share(model)  # HF drops the cache under checkpointing in training
    with torch.no_grad():
        assert prefix.can_share(model)  # ... but not in a no-grad pass
    ids, mask = _group_batch()
    lp, _ = sequence_logprobs(model, ids, mask, P)
    lp.sum().backward()
    ref = tiny_causal_lm("qwen2")
    torch.testing.assert_close(lp, sequence_logprobs(ref, ids, mask, P, share_prompts=False)[0], rtol=0, atol=1e-5)


def test_lora_adapters_are_used_on_the_shared_path():
    peft = pytest.importorskip("peft")
    base = tiny_causal_lm("qwen2")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(copy.deepcopy(base), cfg)
    ids, mask = _group_batch()
    assert prefix.can_share(lora)
    lp, _ = sequence_logprobs(lora, ids, mask, P)
    merged = copy.deepcopy(lora).merge_and_unload()
    torch.testing.assert_close(lp, sequence_logprobs(merged, ids, mask, P, share_prompts=False)[0],
                               rtol=0, atol=1e-5)
    assert (lp - sequence_logprobs(base, ids, mask, P)[0]).abs().max() > 1e-3


def test_shared_prompt_gradients_are_bitwise_reproducible():
    """A prompt's n gradients are summed in a fixed order (index_select's backward), so two
    identical backward passes agree bit for bit even with shuffled rows and 2+ threads --
    advanced indexing's index_put backward does not, and made whole runs drift."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=256, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
                                         pad_token_id=0, eos_token_id=1)).eval()
    ids, mask = _group_batch()
    order = torch.randperm(ids.shape[0] * 16, generator=torch.Generator().manual_seed(0)) % ids.shape[0]
    ids, mask = ids[order], mask[order]  # 160 rows, prompts repeated in a shuffled order
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        grads = set()
        for _ in range(10):
            model.zero_grad(set_to_none=True)
            lp, _ = sequence_logprobs(model, ids, mask, P)
            lp.sum().backward()
            grads.add(b"".join(p.grad.numpy().tobytes() for p in model.parameters() if p.grad is not None))
    finally:
        torch.set_num_threads(threads)
    assert len(grads) == 1


def test_one_response_column_needs_only_the_prompt_pass():
    """The last column never runs (its output would predict the token after the sequence),
    so a one-token response is scored from the shared prompt pass alone."""
    model = tiny_causal_lm("qwen2").double()
    ids, mask = _group_batch()
    ids, mask = ids[:, : P + 1], mask[:, : P + 1]
    calls, handle = _counting_decoder_calls(model)
    lp, _ = sequence_logprobs(model, ids, mask, P)
    handle.remove()
    assert len(calls) == 1 and lp.shape == (ids.shape[0], 1)
    torch.testing.assert_close(lp, sequence_logprobs(model, ids, mask, P, share_prompts=False)[0], rtol=0, atol=1e-10)
    full, _ = sequence_logprobs(model, *_group_batch(), P)
    torch.testing.assert_close(lp[:, 0], full[:, 0], rtol=0, atol=1e-10)


def _ragged_batch():
    """_group_batch with one more all-pad prompt column and two all-pad response columns."""
    ids, mask = _group_batch()
    zeros = torch.zeros(ids.shape[0], 1, dtype=ids.dtype)
    ids = torch.cat([zeros, ids, zeros, zeros], 1)
    mask = torch.cat([zeros, mask, zeros, zeros], 1)
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("share", [True, False])
def test_length_buckets_equal_the_padded_forward_values_and_gradients(arch, share):
    """One decoder call per response-length bucket (each at its own width), pad columns never
    run: the same log-probs, entropies and gradients as one untrimmed padded forward."""
    model = tiny_causal_lm(arch).double()
    ids, mask = _ragged_batch()
    p = P + 1
    widths = []
    decoder = model.get_decoder()
    handle = decoder.register_forward_pre_hook(
        lambda mod, args, kwargs: widths.append(kwargs["input_ids"].shape), with_kwargs=True)
    lp, ent = sequence_logprobs(model, ids, mask, p, with_entropy=True, chunk_size=4, share_prompts=share,
                                bucket_overhead_tokens=0, pack=False)
    handle.remove()
    # buckets of response widths 2, 3, 4 and 5 (+ the shared prompt pass); never the 2 all-pad
    # response columns, the last column, nor the all-pad first prompt column
    assert len(widths) == 4 + share and max(w[1] for w in widths) <= ids.shape[1] - 4
    assert sum(w[0] for w in widths[share:]) == ids.shape[0]
    ref, ref_ent = _untrimmed(model, ids, mask, p, with_entropy=True)
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-10)
    assert lp.shape == (ids.shape[0], ids.shape[1] - p) and (lp[mask[:, p:] == 0] == 0).all()
    assert lp.std() > 0.3

    params = list(model.parameters())
    up = torch.randn(lp.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad((sequence_logprobs(model, ids, mask, p, share_prompts=share, bucket_overhead_tokens=0,
                                                 pack=False)[0] * up).sum(), params, allow_unused=True)
    want = torch.autograd.grad((_untrimmed(model, ids, mask, p)[0] * up).sum(), params, allow_unused=True)
    _assert_grads_close(got, want, arch)


def _untrimmed(model, ids, mask, p, with_entropy=False):
    """The reference: every column of every row through one decoder call, full logits."""
    pos = prefix.positions(mask)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, p - 1:-1]
    logsm = logits.log_softmax(-1)
    keep = mask[:, p:].to(logsm.dtype)
    lp = logsm.gather(-1, ids[:, p:, None]).squeeze(-1) * keep
    ent = -(logsm.exp() * logsm).sum(-1).detach() * keep if with_entropy else None
    return lp, ent


def test_plan_buckets_minimises_padded_work():
    from rpgrl.models.logprobs import plan_buckets

    widths = torch.tensor([5, 0, 2, 5, 2, 3, 64, 60])
    one = plan_buckets(widths, float("inf"))
    assert len(one) == 1 and sorted(one[0].tolist()) == [0, 2, 3, 4, 5, 6, 7]  # width 0: nothing to run
    many = plan_buckets(widths, 0.0)
    assert [sorted(b.tolist()) for b in many] == [[2, 4], [5], [0, 3], [7], [6]]
    # one call costs 10 tokens: {2,2,3,5,5} at width 5 (25) + {60,64} at 64 (128) + 2 calls = 173 is best
    assert [sorted(b.tolist()) for b in plan_buckets(widths, 10.0)] == [[0, 2, 3, 4, 5], [6, 7]]
