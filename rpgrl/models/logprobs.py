"""Memory-bounded token log-probs (and entropy) for causal LMs.

Every RPG loss (docs/math.md §1: ``lp_t``, ``lp_old_t``, ``lp_anc_t``) needs
``log pi(y_t | h_t)`` only at the sampled token, yet the naive route materialises
``[B, T, V]`` float32 logits — 2.1 GB for B=8, T=2048, V=32k, ~10 GB at V=150k — and
autograd keeps that tensor (plus its softmax) alive for backward. Here the LM head is
applied to chunks of flattened tokens: the forward keeps only a per-token logsumexp, the
backward recomputes each chunk's logits (when all tokens fit one chunk, the forward keeps
that chunk's softmax for the backward instead: the same numbers without a second LM-head
matmul). Peak extra memory is O(chunk_size * V) in both passes, independent of B * T.

Temperature: a rollout sampled at temperature tau draws from ``softmax(logits / tau)``,
so the behaviour policy ``pi_old`` of the importance weight ``w_t`` (docs/math.md §1) is the
tempered one. The log-probs fed to the loss must use the same tau as generation,
otherwise ``w_t != 1`` on-policy and the KL terms measure the wrong distribution. Pass
the generation temperature here for ``lp``, ``lp_old`` and ``lp_anc`` alike (the paper
uses tau = 1.0, docs/math.md §7).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rpgrl.models.packing import packed_response_hidden
from rpgrl.models.tied_grad import HeadGrad, tied_embedding_grad
from rpgrl.models.prefix import (can_share, encode_prompts, first_real_column, has_repeats, last_hidden, positions,
                                 response_hidden, unwrap)

__all__ = ["token_logprobs_from_hidden", "sequence_logprobs", "plan_buckets"]

# Config attributes that transform logits after lm_head; the chunked path does not
# replicate them, so refusing is safer than returning silently wrong log-probs.
_UNSUPPORTED_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float, soft_dtype: torch.dtype) -> Tensor:
    """Logits of one chunk, ``(h @ W^T + b) / tau``, in ``soft_dtype`` (>= float32).

    The matmul runs in the parameters' dtype (as HF's ``lm_head(h).float()`` does), so a
    bf16 model never needs an fp32 copy of the [V, H] weight.
    """
    z = (h @ weight.T).to(soft_dtype)
    if bias is not None:
        z += bias.to(soft_dtype)
    if temperature != 1.0:
        z /= temperature
    return z


class _ChunkedTokenLogprob(torch.autograd.Function):
    """log softmax((h W^T + b)/tau)[y] with O(chunk * V) memory in forward and backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, temperature, with_entropy, keep_probs, head_grad):  # type: ignore[override]
        n = hidden.shape[0]
        mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        soft_dtype = torch.promote_types(mm_dtype, torch.float32)
        w = weight.to(mm_dtype)
        logp = hidden.new_empty(n, dtype=soft_dtype)
        lse = hidden.new_empty(n, dtype=soft_dtype)
        entropy = hidden.new_empty(n if with_entropy else 0, dtype=soft_dtype)
        # One chunk under autograd: keep its softmax for backward instead of recomputing the
        # logits there (the [n, H] x [H, V] matmul again); memory stays O(chunk * V), and the
        # backward gets the very numbers it would have recomputed (the same matmul and exp).
        keep = keep_probs and n <= chunk_size
        probs = None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z = _chunk_logits(hidden[s:e].to(mm_dtype), w, bias, temperature, soft_dtype)
            lse_c = torch.logsumexp(z, dim=-1)
            lse[s:e] = lse_c
            logp[s:e] = z.gather(1, targets[s:e, None]).squeeze(1) - lse_c
            if with_entropy or keep:
                z -= lse_c[:, None]  # z is now log p, in place: at most 2 chunk buffers live
                p = z.exp()
                if keep:
                    probs = p.clone() if with_entropy else p
                if with_entropy:
                    p *= z
                    entropy[s:e] = -p.sum(-1)
                del p
            del z
        ctx.save_for_backward(hidden, weight, bias, targets, lse, probs)
        ctx.chunk_size, ctx.temperature, ctx.head_grad = chunk_size, temperature, head_grad
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, _grad_entropy):  # type: ignore[override]
        with _no_autocast(grad_logp):  # as in forward, even if backward is called under autocast
            return _ChunkedTokenLogprob._backward(ctx, grad_logp)

    @staticmethod
    def _backward(ctx, grad_logp):
        hidden, weight, bias, targets, lse, probs = ctx.saved_tensors
        chunk_size, temperature = ctx.chunk_size, ctx.temperature
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        soft_dtype = lse.dtype
        w = weight.to(mm_dtype)
        g_all = grad_logp.to(soft_dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        # Accumulate weight/bias grads in >= fp32 across chunks; cast once at the end. The first
        # chunk's matmul writes grad_w (no [V, H] zero-fill: 113 MB per backward at V = 49k).
        grad_w = None
        grad_b = torch.zeros(bias.shape, dtype=soft_dtype, device=bias.device) if need_b else None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            h = hidden[s:e].to(mm_dtype)
            g = g_all[s:e]
            # d logp / d z = onehot(y) - softmax(z); built in place in the logits buffer.
            if probs is not None:  # the forward's single chunk, kept (not written: retain_graph)
                gz = probs * -g[:, None]
            else:
                gz = _chunk_logits(h, w, bias, temperature, soft_dtype)
                gz -= lse[s:e, None]
                gz.exp_()
                gz *= -g[:, None]
            gz.scatter_add_(1, targets[s:e, None], g[:, None])
            if temperature != 1.0:
                gz /= temperature  # chain rule through z = logits / tau
            if need_h:
                grad_h[s:e] = (gz.to(mm_dtype) @ w).to(hidden.dtype)
            if need_w:
                if grad_w is None:
                    grad_w = gz.T @ h.to(soft_dtype)
                else:
                    grad_w.addmm_(gz.T, h.to(soft_dtype))
            if need_b:
                grad_b += gz.sum(0)
            del gz
        if need_w and grad_w is None:  # no token: a zero gradient
            grad_w = torch.zeros(weight.shape, dtype=soft_dtype, device=weight.device)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        if grad_w is not None and ctx.head_grad is not None:  # the tied lookup returns it (tied_grad)
            ctx.head_grad.grad, grad_w = grad_w, None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def token_logprobs_from_hidden(
    hidden: Tensor,
    lm_head_weight: Tensor,
    targets: Tensor,
    *,
    lm_head_bias: Tensor | None = None,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    temperature: float = 1.0,
    head_grad: HeadGrad | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``log softmax((hidden @ W^T + b) / temperature)[targets]`` without [B, T, V] logits.

    Args:
        hidden: [B, T, H] final hidden states (after the decoder's final norm).
        lm_head_weight: [V, H] output-embedding weight (tied or not).
        targets: [B, T] long token ids in [0, V) whose log-probs are wanted.
        lm_head_bias: optional [V] bias (e.g. some GPT-style heads).
        chunk_size: tokens per chunk; peak extra memory ~ 2-3 * chunk_size * V * 4 bytes.
        with_entropy: also return the per-token entropy of the tempered policy (for the
            "actor entropy" metric, docs/math.md §7); it is detached (logging only).
        temperature: the sampling temperature of the rollout; must match generation so
            that the loss sees the behaviour policy softmax(logits / tau) (module doc).
        head_grad: for a weight tied to an input embedding opened with
            ``rpgrl.models.tied_grad.tied_embedding_grad``: the weight's gradient goes there,
            to reach the weight through the lookup's backward (one dense gradient, no copy).

    Returns:
        (logp [B, T], entropy [B, T] or None), in float32 (float64 if the inputs are).
        ``logp`` is differentiable w.r.t. ``hidden``, ``lm_head_weight`` and the bias;
        backward recomputes logits chunk by chunk, so it is memory-bounded too.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    b, t, h = hidden.shape
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != h:
        raise ValueError(f"lm_head_weight must be [V, {h}] to match hidden, got {tuple(lm_head_weight.shape)}")
    v = lm_head_weight.shape[0]
    if tuple(targets.shape) != (b, t):
        raise ValueError(f"targets must be [B, T] = {(b, t)}, got {tuple(targets.shape)}")
    if targets.dtype != torch.long:
        raise TypeError(f"targets must be torch.long token ids, got {targets.dtype}")
    if lm_head_bias is not None and tuple(lm_head_bias.shape) != (v,):
        raise ValueError(f"lm_head_bias must be [{v}], got {tuple(lm_head_bias.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (it divides the logits), got {temperature}")
    flat_targets = targets.reshape(-1)
    if flat_targets.numel() and (int(flat_targets.min()) < 0 or int(flat_targets.max()) >= v):
        raise ValueError(
            f"targets must be token ids in [0, {v}); got range "
            f"[{int(flat_targets.min())}, {int(flat_targets.max())}] (mask padding instead of using -100)"
        )
    with _no_autocast(hidden):  # bf16 mixed precision: the head and log-softmax stay fp32
        logp, entropy = _ChunkedTokenLogprob.apply(
            hidden.reshape(b * t, h), lm_head_weight, lm_head_bias, flat_targets,
            int(chunk_size), float(temperature), bool(with_entropy),
            torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                            for t in (hidden, lm_head_weight, lm_head_bias)),
            head_grad,
        )
    return logp.view(b, t), (entropy.view(b, t) if with_entropy else None)


def _no_autocast(t: Tensor):
    """Autocast off on ``t``'s device: under bf16 autocast ``h @ W^T`` would be a bf16 matmul
    (logits rounded to 8 mantissa bits, ~0.1 at |z| = 20); here it runs in the weights' dtype
    (fp32 master weights: fp32) and the log-softmax after it in fp32 (docs/precision.md)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _unwrap_causal_lm(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Return (decoder, lm_head) of a HF causal LM, PEFT-wrapped or not."""
    model = unwrap(model)  # peft.PeftModel -> the HF model with adapters injected
    config = getattr(model, "config", None)
    for attr in _UNSUPPORTED_LOGIT_TRANSFORMS:
        val = getattr(config, attr, None)
        if val is not None and val != 1.0:
            raise NotImplementedError(
                f"{type(model).__name__}: config.{attr}={val} transforms logits after lm_head; "
                "sequence_logprobs does not replicate it"
            )
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "base_model", None)
    if decoder is None or decoder is model:
        raise TypeError(f"{type(model).__name__}: cannot locate the base decoder (get_decoder()/base_model)")
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise TypeError(f"{type(model).__name__}.get_output_embeddings() has no weight tensor")
    if hasattr(head, "base_layer"):  # a PEFT tuner wraps lm_head: its .weight misses the adapter
        raise NotImplementedError(
            f"{type(model).__name__}: lm_head is adapter-wrapped ({type(head).__name__}); "
            "exclude lm_head from the LoRA target_modules or merge the adapter first"
        )
    return decoder, head


def plan_buckets(widths: Tensor, overhead_tokens: float) -> list[Tensor]:
    """Split rows into buckets of similar response width, minimising padded work.

    Rows sorted by ``widths`` (the response columns each row needs); a bucket of rows i..j
    costs ``(j - i + 1) * widths[j] + overhead_tokens`` (its padded tokens plus one extra
    decoder call, in token units); exact dynamic programming over the split points. Rows of
    width 0 (nothing to score) are left out. Returns the row indices of each bucket.
    """
    order = torch.argsort(widths, stable=True)
    w = widths[order].tolist()
    first = next((i for i, x in enumerate(w) if x > 0), len(w))
    w, order = w[first:], order[first:]
    n = len(w)
    if n == 0:
        return []
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            c = best[i] + (j - i) * w[j - 1] + overhead_tokens
            if c < best[j]:
                best[j], cut[j] = c, i
    bounds, j = [], n
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    return [order[i:j] for i, j in reversed(bounds)]


def _fsdp_sharded(model: nn.Module) -> bool:
    """FSDP ranks must make the same decoder calls (each all-gathers): no data-dependent buckets."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_start: int | Tensor,
    *,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    temperature: float = 1.0,
    share_prompts: bool = True,
    bucket_overhead_tokens: float = 32.0,
    pack: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Response-token log-probs of a HF causal LM (``lp_t`` / ``lp_old_t``, docs/math.md §1).

    Layout: ``input_ids`` is [B, L] = left-padded prompt of length P then right-padded
    response of length R = L - P, ``response_start = P``. Returns ``logp[:, j] =
    log pi(input_ids[:, P+j] | input_ids[:, :P+j])`` of shape [B, R], computed from the
    decoder's final hidden states with :func:`token_logprobs_from_hidden` (the full
    [B, L, V] logits are never formed). Positions are ``cumsum(mask) - 1`` clamped at 0,
    as in ``generate``, so left padding does not shift RoPE/learned positions.
    Positions where ``attention_mask[:, P+j] == 0`` (response padding) get logp = 0
    and entropy = 0 (no gradient), so they are safe to sum; still mask them in losses.

    ``response_start`` may be an int, a 0-d tensor, or a [B] tensor of per-row starts
    (then R = L - min(start) and slots past a row's end are masked to 0).

    No work on padding (one shared start): the decoder never runs a row's columns past its
    last real response token, nor prompt columns that are padding in every row, and the
    LM head only sees real response tokens. Rows are grouped into buckets of similar
    response length (:func:`plan_buckets`; ``bucket_overhead_tokens`` prices one extra
    decoder call, ``float("inf")`` = one bucket), each run at its own width. Under causal
    attention the dropped columns cannot change the kept ones, so values and gradients are
    the padded forward's (tests/test_prefix.py, tests/test_logprobs.py).

    ``share_prompts``: rows with the same prompt (a GRPO group) run that prompt through the
    decoder once (``rpgrl.models.prefix``; same values and gradients, fewer FLOPs) and every bucket
    continues its KV cache. Used when all rows share one ``response_start`` and the model
    supports it; else each bucket runs the padded forward over its own columns.

    ``pack`` (with ``share_prompts``): where the model allows it (``rpgrl.models.packing.can_pack``),
    each prompt and its responses go into one row with a 4D attention mask, so the whole batch
    is one decoder call (with gradients, far cheaper than the prompt call plus one call per
    bucket; same values and gradients). Else the shared-prompt path above.

    Nothing to score (every response empty, or no response column): zeros of shape [B, R],
    still computed through the decoder and LM head, so ``loss.backward()`` works and gives
    zero gradients. Under FSDP (``fully_shard``) every rank must make the same decoder
    calls, so the path depends only on the arguments' kinds, never on the data: one bucket,
    prompts shared whenever the model allows it, the continuation call run even for a
    one-token bucket, and per-row starts (a [B] tensor) take the per-row path even when
    they are all equal. Every rank must pass at least one row (HF decoders cannot run
    an empty batch; a 0-row call returns at once).

    Raises ValueError when a row's column ``response_start - 1`` is padding although the
    row has real prompt tokens (a right-padded prompt block): the first response token
    would be predicted from a pad.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be [B, L]; got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    bsz, length = input_ids.shape
    device = input_ids.device
    start = torch.as_tensor(response_start, device=device, dtype=torch.long)
    scalar_start = start.dim() == 0
    if scalar_start:
        start = start.expand(bsz)
    if tuple(start.shape) != (bsz,):
        raise ValueError(f"response_start must be an int or a [{bsz}] tensor, got shape {tuple(start.shape)}")
    if bsz and (int(start.min()) < 1 or int(start.max()) > length):
        raise ValueError(
            f"response_start must lie in [1, L={length}] (a response token needs a prompt "
            f"token before it); got range [{int(start.min())}, {int(start.max())}]"
        )
    resp_len = length - int(start.min()) if bsz else 0
    decoder, head = _unwrap_causal_lm(model)
    out_dtype = torch.promote_types(head.weight.dtype, torch.float32)
    if bsz == 0:
        empty = torch.zeros(0, resp_len, device=device, dtype=out_dtype)
        return empty, (empty.clone() if with_entropy else None)
    _check_left_padded(attention_mask, start)
    if resp_len == 0:
        # No response column: score one appended all-pad column and keep none of it, so the
        # (empty) result comes from the same calls as any other (docstring: FSDP, backward).
        ids = torch.cat([input_ids, input_ids[:, -1:]], 1)
        mask = torch.cat([attention_mask, torch.zeros_like(attention_mask[:, -1:])], 1)
        logp, entropy = sequence_logprobs(
            model, ids, mask, response_start, chunk_size=chunk_size, with_entropy=with_entropy,
            temperature=temperature, share_prompts=share_prompts, bucket_overhead_tokens=bucket_overhead_tokens,
            pack=pack)
        return logp[:, :0], (entropy[:, :0] if entropy is not None else None)
    fsdp = _fsdp_sharded(model)
    # FSDP's sharded weights keep autograd's own accumulation
    with tied_embedding_grad(unwrap(model), head, enabled=not fsdp) as head_grad:
        return _response_logprobs(model, decoder, head, input_ids, attention_mask, start, resp_len, scalar_start,
                                  fsdp, chunk_size=chunk_size, with_entropy=with_entropy, temperature=temperature,
                                  share_prompts=share_prompts, bucket_overhead_tokens=bucket_overhead_tokens, pack=pack,
                                  head_grad=head_grad)


def _response_logprobs(model, decoder, head, input_ids, attention_mask, start, resp_len, scalar_start, fsdp, *,
                       chunk_size, with_entropy, temperature, share_prompts, bucket_overhead_tokens, pack, head_grad):
    """The body of :func:`sequence_logprobs` once the arguments are checked."""
    bsz, length = input_ids.shape
    device = input_ids.device
    out_dtype = torch.promote_types(head.weight.dtype, torch.float32)
    # Token at column c = start + j is predicted by the hidden state at column c - 1.
    cols = start[:, None] + torch.arange(resp_len, device=device)[None, :]  # [B, R]
    valid = cols < length
    cols = cols.clamp(max=length - 1)
    targets = input_ids.gather(1, cols)
    valid &= attention_mask.gather(1, cols).bool()
    # FSDP: the kind of response_start, not its values, picks the path (docstring)
    one_start = scalar_start if fsdp else bool((start == start[0]).all())
    # Each row needs its response columns up to its last real token, no further.
    widths = torch.where(valid, torch.arange(1, resp_len + 1, device=device), 0).amax(1)
    packed = None
    if one_start and share_prompts and pack and not fsdp:  # one decoder call for the whole batch (rpgrl.models.packing)
        packed = packed_response_hidden(decoder, input_ids, attention_mask, int(start[0]), widths,
                                        dtype=head.weight.dtype)
    if packed is not None:
        parts = [(torch.arange(bsz, device=device), packed.shape[1], packed)]
    elif one_start:
        P = int(start[0])
        every_row = [torch.arange(bsz, device=device)]
        if fsdp:  # one bucket, whatever the widths
            buckets = every_row
        else:  # nothing to score: still one (prompt) pass, so that the zeros have a graph
            buckets = [b.to(device) for b in plan_buckets(widths.cpu(), float(bucket_overhead_tokens))] or every_row
        shared = None
        if share_prompts and can_share(model):
            if fsdp or len(buckets) > 1 or has_repeats(input_ids[:, :P], attention_mask[:, :P]):
                shared = encode_prompts(decoder, input_ids[:, :P], attention_mask[:, :P])
        parts = []
        for rows in buckets:
            width = max(int(widths[rows].max()), 1)
            if shared is not None:
                # a 1-token bucket needs only the prompt pass; FSDP still runs the continuation
                # call (width 2 fits: resp_len >= 1) and drops its column, as every rank must
                run = max(width, 2) if fsdp else width
                h = response_hidden(decoder, shared, rows, input_ids, attention_mask, P, run)[:, :width]
            else:
                h = _padded_hidden(decoder, input_ids.index_select(0, rows),
                                   attention_mask.index_select(0, rows), P, width)
            parts.append((rows, width, h))
    else:
        # Per-row starts: one padded forward; column L - 1's output would predict the token
        # after the sequence, so it never runs.
        out = decoder(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                      position_ids=positions(attention_mask[:, :-1]), use_cache=False)
        hidden = last_hidden(out)
        h = hidden.gather(1, (cols - 1)[:, :, None].expand(-1, -1, hidden.shape[-1]))
        parts = [(torch.arange(bsz, device=device), resp_len, h)]
    # Only real response tokens go through the LM head; outputs are scattered back to [B, R].
    flat_h, dest = [], []
    for rows, width, h in parts:
        keep = valid.index_select(0, rows)[:, :width]
        flat_h.append(h[keep])
        dest.append((rows[:, None] * resp_len + torch.arange(width, device=device))[keep])
    flat_h, dest = torch.cat(flat_h), torch.cat(dest)
    zeros = torch.zeros(bsz * resp_len, device=device, dtype=out_dtype)
    # also with no token to score (dest empty): the LM head then sees 0 rows and the zeros
    # below stay attached to the graph of the decoder calls above (zero gradients)
    logp, entropy = token_logprobs_from_hidden(
        flat_h[None], head.weight, targets.reshape(-1).index_select(0, dest)[None],
        lm_head_bias=getattr(head, "bias", None), chunk_size=chunk_size, with_entropy=with_entropy,
        temperature=temperature, head_grad=head_grad,
    )
    logp = zeros.index_copy(0, dest, logp[0].to(out_dtype)).view(bsz, resp_len)
    if entropy is not None:
        entropy = zeros.index_copy(0, dest, entropy[0].to(out_dtype)).view(bsz, resp_len)
    return logp, entropy


def _check_left_padded(attention_mask: Tensor, start: Tensor) -> None:
    """Column ``start - 1`` predicts a row's first response token, so it must be real
    whenever the row has real prompt tokens and a response to score: a right-padded prompt
    block would score the response from a pad, silently wrong (all-pad prompts and rows with
    nothing to score are let through)."""
    before = (start - 1)[:, None]
    last_real = attention_mask.gather(1, before)[:, 0] != 0
    seen = attention_mask.ne(0).long().cumsum(1)
    in_prompt = seen.gather(1, before)[:, 0]
    bad = ((in_prompt > 0) & (seen[:, -1] > in_prompt) & ~last_real).nonzero()
    if bad.numel():
        r = int(bad[0, 0])
        s = int(start[r])
        raise ValueError(
            f"row {r}: attention_mask[{r}, {s - 1}] == 0 but the row has real prompt tokens before "
            f"response_start={s}; the prompt block must be left-padded (padding before the prompt, "
            f"none between the prompt and the response) -- a right-padded prompt would score the "
            f"response from a pad token. Re-pad the prompt on the left."
        )


def _padded_hidden(decoder: nn.Module, input_ids: Tensor, attention_mask: Tensor, P: int, width: int) -> Tensor:
    """[b, width, H] hidden states predicting response columns 0..width-1, from one padded
    forward over only the columns they need: from the first prompt column that is real in
    some row to P + width - 2 (later columns cannot change them under causal attention;
    all-pad left columns are masked keys and do not move ``cumsum(mask) - 1`` positions)."""
    lo = first_real_column(attention_mask[:, :P], P - 1)
    ids, mask = input_ids[:, lo:P + width - 1], attention_mask[:, lo:P + width - 1]
    out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
    return last_hidden(out)[:, P - 1 - lo:]
