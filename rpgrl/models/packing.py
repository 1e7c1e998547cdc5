"""Packed groups: a prompt and all its responses in one row, one decoder call per batch.

The shared-prompt path (``rpgrl.models.prefix``) runs the distinct prompts once and then each
bucket of responses against their KV cache: at least two decoder calls per micro-batch. With
gradients a call costs far more than its tokens: every weight is read for the forward, read
again for the input gradient, and gets its own weight-gradient matmul whose [out, in] result
is then *added* to the other calls' (autograd sums a weight used twice). Measured on the
off-policy study's step (docs/benchmarks.md, section 5) packing saved 5 % of the update and
27 % of the pi_old pass: the update's micro-batches hold shuffled sequences of ~8 different
prompts, so its cost is mostly the tokens themselves.

Here each distinct prompt's real tokens and then its responses' tokens go into one row:
``[prompt | response 1 | response 2 | ...]``, positions as in the padded layout (a response
continues at the prompt's length), and a 4D attention mask lets a response token see the
prompt and the earlier tokens of its own response only. Under causal attention that is
exactly what the padded forward computes for those tokens, so log-probs and gradients are
the padded forward's up to the order of floating-point sums (tests/test_prefix.py checks
both in float64). One decoder call, one weight-gradient matmul per weight, prompt tokens
once.

Only where the 4D mask is known to be honoured as given (Hugging Face's mask utilities pass
a 4D mask through unchanged: Llama, Qwen2/3, Mistral without a sliding window shorter than
the row, with the SDPA or eager attention) and the packed row stays short (the mask is
[row, row] and attention work grows with its square): :func:`can_pack` decides, else callers
keep the shared-prompt path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rpgrl.models.prefix import dedupe_rows, last_hidden

__all__ = ["PACKABLE_MODEL_TYPES", "MAX_PACKED_TOKENS", "can_pack", "packed_response_hidden"]

#: architectures whose decoder takes a custom 4D mask as is (transformers' masking utilities)
PACKABLE_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})
#: the longest packed row (its mask is [T, T] and attention grows with T^2)
MAX_PACKED_TOKENS = 2048


def can_pack(decoder: nn.Module, packed_len: int) -> bool:
    """Whether ``decoder`` honours a custom 4D mask for a row of ``packed_len`` tokens."""
    config = getattr(decoder, "config", None)
    if config is None or getattr(config, "model_type", None) not in PACKABLE_MODEL_TYPES:
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    window = getattr(config, "sliding_window", None)
    sliding = getattr(config, "use_sliding_window", True) or any(
        t != "full_attention" for t in getattr(config, "layer_types", None) or ())
    if window is not None and sliding and packed_len > window:  # the custom mask ignores the window
        return False
    return packed_len <= MAX_PACKED_TOKENS


def packed_response_hidden(decoder: nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_len: int,
                           widths: Tensor, *, dtype: torch.dtype) -> Tensor | None:
    """[B, W, H] hidden states predicting response columns 0..W-1 (W = max ``widths``) of every
    row, from one decoder call over the packed groups (module docstring); columns at or past a
    row's width hold another token's state and must be masked by the caller. None when packing
    does not apply (:func:`can_pack`, or a prompt with no real token)."""
    P = prompt_len
    B = input_ids.shape[0]
    prompt_ids, prompt_mask = input_ids[:, :P], attention_mask[:, :P]
    found = dedupe_rows(prompt_ids, prompt_mask)
    if found is None:
        uniq_ids, uniq_mask, inverse = prompt_ids, prompt_mask, torch.arange(B, device=input_ids.device)
    else:
        uniq_ids, uniq_mask, inverse = found
    prompt_real = uniq_mask.bool()
    plen = prompt_real.sum(1).tolist()
    if min(plen) == 0:
        return None
    w = widths.tolist()
    W = max(max(w), 1)
    inv = inverse.tolist()
    members: list[list[int]] = [[] for _ in plen]
    for r, g in enumerate(inv):
        members[g].append(r)
    lengths = [plen[g] + sum(max(w[r] - 1, 0) for r in members[g]) for g in range(len(plen))]
    T = max(lengths)
    if not can_pack(decoder, T):
        return None
    G, dev = len(plen), input_ids.device
    ids = torch.zeros(G, T, dtype=input_ids.dtype, device=dev)
    pos = torch.zeros(G, T, dtype=torch.long, device=dev)
    seg = torch.full((G, T), -1, dtype=torch.long, device=dev)  # 0: prompt, r + 1: row r, -1: padding
    where = torch.zeros(B, W, dtype=torch.long, device=dev)  # flat index (g * T + t) of each output
    for g in range(G):
        p = plen[g]
        ids[g, :p] = uniq_ids[g][prompt_real[g]]
        pos[g, :p] = torch.arange(p, device=dev)
        seg[g, :p] = 0
        t = p
        for r in members[g]:
            where[r, 0] = g * T + p - 1  # the prompt's last token predicts response column 0
            k = max(w[r] - 1, 0)
            if k:
                ids[g, t:t + k] = input_ids[r, P:P + k]
                pos[g, t:t + k] = torch.arange(p, p + k, device=dev)
                seg[g, t:t + k] = r + 1
                where[r, 1:k + 1] = g * T + torch.arange(t, t + k, device=dev)
            t += k
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril_()
    same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)
    allowed = causal & same & (seg[:, :, None] >= 0)
    allowed |= torch.eye(T, dtype=torch.bool, device=dev)  # padding sees itself: no empty softmax row
    if decoder.config._attn_implementation == "sdpa":  # a boolean mask: True = may attend
        mask4d = allowed[:, None]
    else:  # eager attention adds the mask to the scores
        mask4d = torch.zeros(G, 1, T, T, dtype=dtype, device=dev).masked_fill_(~allowed[:, None],
                                                                                torch.finfo(dtype).min)
    out = decoder(input_ids=ids, attention_mask=mask4d, position_ids=pos, use_cache=False)
    h = last_hidden(out)
    return h.reshape(G * T, -1).index_select(0, where.reshape(-1)).view(B, W, -1)
