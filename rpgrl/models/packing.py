"""Packed groups: a prompt and all its responses in one row, one decoder call per batch.

The shared-prompt path (``rpgrl.models.prefix``) runs the distinct prompts once and then each
bucket of responses against their KV cache: at least two decoder calls per micro-batch. With
gradients a call costs far more than its tokens: every weight is read for the forward, read
again for the input gradient, and gets its own weight-gradient matmul whose [out, in] result
is then *added* to the other calls' (autograd sums a weight used twice). Measured on the
off-policy study's step (docs/benchmarks.md, section 5) one row per prompt saved 5 % of the
update: its micro-batches hold shuffled sequences of ~8 different prompts, so its cost is
mostly the tokens themselves -- hence the shared prefix below.

Here the distinct prompts and their responses go into one row where that is cheaper than a
row each (:func:`_plan_rows`; never past ``MAX_PACKED_TOKENS``): the prompts' common token prefix once -- a chat template's system
prompt is most of a short prompt: 27 of the study's 49 tokens --, then for each prompt the rest
of it and its responses, ``[prefix | rest of prompt 1 | response 1a | 1b | rest of prompt 2 |
response 2a | ...]``, positions as in the padded layout (a response continues at its prompt's
length), and a 4D attention mask lets a token see the prefix, its own prompt's tokens and the
earlier tokens of its own response only. Under causal attention that is exactly what the
padded forward computes for those tokens, so log-probs and gradients are the padded forward's
up to the order of floating-point sums (tests/test_prefix.py checks both in float64). One
decoder call, one weight-gradient matmul per weight, each prompt once and their common prefix
once: the update's shuffled micro-batches (8 sequences of ~8 prompts in the study) run ~40 %
fewer tokens than with one row per prompt.

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

__all__ = ["PACKABLE_MODEL_TYPES", "MAX_PACKED_TOKENS", "can_pack", "common_prefix", "packed_response_hidden"]

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


def common_prefix(prompts: list[list[int]]) -> int:
    """Length of the longest token prefix every prompt in ``prompts`` starts with."""
    first, c = prompts[0], 0
    while c < len(first) and all(len(p) > c and p[c] == first[c] for p in prompts[1:]):
        c += 1
    return c


def _row_length(prompts: list[list[int]], spans: list[int]) -> int:
    """Tokens of one packed row holding these groups: the common prefix once, then each group's
    rest of the prompt and its responses' tokens (``spans``)."""
    c = common_prefix(prompts)
    return c + sum(len(p) - c + k for p, k in zip(prompts, spans))


def _plan_rows(decoder: nn.Module, prompts: list[list[int]], spans: list[int]) -> list[list[int]]:
    """Which groups share a row. A group joins the current row when that is cheaper than a row
    of its own: joining saves the common prefix's tokens (each costs a pass through every
    weight) but the row's attention grows with its length squared (every query against every
    key, masked or not). Cost of a row of T tokens in multiply-adds: T x (weights per token) +
    2 x layers x hidden x T^2. The study's micro-batches (short prompts, ~1 response each) end up
    in one row; the on-policy recipe's (8 long responses per prompt) keep one row per prompt."""
    config = decoder.config
    layers, hidden = config.num_hidden_layers, config.hidden_size
    emb = decoder.get_input_embeddings() if hasattr(decoder, "get_input_embeddings") else None
    skip = {id(p) for p in emb.parameters()} if emb is not None else set()
    per_token = sum(p.numel() for p in decoder.parameters() if p.dim() >= 2 and id(p) not in skip)

    def cost(groups: list[int]) -> float:
        t = _row_length([prompts[x] for x in groups], [spans[x] for x in groups])
        return t * per_token + 2.0 * layers * hidden * t * t

    rows: list[list[int]] = []
    for g in range(len(prompts)):
        if rows:
            joined = rows[-1] + [g]
            if _row_length([prompts[x] for x in joined], [spans[x] for x in joined]) <= MAX_PACKED_TOKENS \
                    and cost(joined) < cost(rows[-1]) + cost([g]):
                rows[-1].append(g)
                continue
        rows.append([g])
    return rows


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
    prompts = [uniq_ids[g][prompt_real[g]].tolist() for g in range(uniq_ids.shape[0])]
    if min(len(p) for p in prompts) == 0:
        return None
    w = widths.tolist()
    W = max(max(w), 1)
    members: list[list[int]] = [[] for _ in prompts]
    for r, g in enumerate(inverse.tolist()):
        members[g].append(r)
    spans = [sum(max(w[r] - 1, 0) for r in members[g]) for g in range(len(prompts))]
    rows = _plan_rows(decoder, prompts, spans)
    lengths = [_row_length([prompts[x] for x in row], [spans[x] for x in row]) for row in rows]
    T = max(lengths)
    if not can_pack(decoder, T):
        return None
    R, dev = len(rows), input_ids.device
    ids = torch.zeros(R, T, dtype=input_ids.dtype, device=dev)
    pos = torch.zeros(R, T, dtype=torch.long, device=dev)
    # per token: its group (-1: the row's common prefix; -2: padding) and its response (-1: prompt)
    grp = torch.full((R, T), -2, dtype=torch.long, device=dev)
    rsp = torch.full((R, T), -1, dtype=torch.long, device=dev)
    where = torch.zeros(B, W, dtype=torch.long, device=dev)  # flat index (row * T + t) of each output
    for i, row in enumerate(rows):
        c = common_prefix([prompts[g] for g in row])
        ids[i, :c] = torch.tensor(prompts[row[0]][:c], dtype=ids.dtype)
        pos[i, :c] = torch.arange(c, device=dev)
        grp[i, :c] = -1
        t = c
        for g in row:
            p = len(prompts[g])
            ids[i, t:t + p - c] = torch.tensor(prompts[g][c:], dtype=ids.dtype)
            pos[i, t:t + p - c] = torch.arange(c, p, device=dev)
            grp[i, t:t + p - c] = g
            last = t + p - c - 1 if p > c else c - 1  # the prompt's last token predicts response column 0
            t += p - c
            for r in members[g]:
                where[r, 0] = i * T + last
                k = max(w[r] - 1, 0)
                if k:
                    ids[i, t:t + k] = input_ids[r, P:P + k]
                    pos[i, t:t + k] = torch.arange(p, p + k, device=dev)
                    grp[i, t:t + k] = g
                    rsp[i, t:t + k] = r
                    where[r, 1:k + 1] = i * T + torch.arange(t, t + k, device=dev)
                t += k
    # a token sees (causally) the common prefix, its own group's prompt tokens and its own response
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril_()
    key_grp, key_rsp = grp[:, None, :], rsp[:, None, :]
    visible = (key_grp == -1) | ((key_grp == grp[:, :, None]) & ((key_rsp == -1) | (key_rsp == rsp[:, :, None])))
    allowed = causal & visible & (grp[:, :, None] != -2) & (key_grp != -2)
    allowed |= torch.eye(T, dtype=torch.bool, device=dev)  # padding sees itself: no empty softmax row
    if decoder.config._attn_implementation == "sdpa":  # a boolean mask: True = may attend
        mask4d = allowed[:, None]
    else:  # eager attention adds the mask to the scores
        mask4d = torch.zeros(R, 1, T, T, dtype=dtype, device=dev).masked_fill_(~allowed[:, None],
                                                                                torch.finfo(dtype).min)
    out = decoder(input_ids=ids, attention_mask=mask4d, position_ids=pos, use_cache=False)
    h = last_hidden(out)
    return h.reshape(R * T, -1).index_select(0, where.reshape(-1)).view(B, W, -1)
