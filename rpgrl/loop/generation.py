"""The generation stage: sample responses from a causal LM (KV cache) into one padded batch,
and the ``Sampler`` that generates and scores them for training and evaluation alike
(docs/math.md §7). Another rollout engine (e.g. vLLM) is one new class with the Sampler's
three methods (``sync``, ``generate``, ``score``), not a branch in the trainer; ``sync(model)``
is where such an engine would load the trainer's weights -- this one samples from the
module itself, so it only records it.

Layout of the returned batch, shared with ``rpgrl.models.logprobs.sequence_logprobs``:
``input_ids = [left-padded prompt (P) | right-padded response (R)]``. The response mask
covers generated tokens up to and including the first EOS.

The sampler must be the policy whose log-probs the loss uses (pi_old, docs/math.md §1): tokens
are drawn from plain softmax(logits / temperature) -- no top-k (HF's default top_k=50) and
none of a model's ``generation_config`` extras (e.g. Qwen-Instruct's repetition_penalty).
``top_p < 1`` truncates the sampler; like verl we then still score with the full softmax,
which the docs call out. rpgrl's own loop (:func:`_decode`) prefills each prompt once for
its n samples and drops finished rows; HF ``generate`` remains for models whose cache that
loop cannot index (recurrent / hybrid state).

The Sampler's ``compute``: the context generation runs in -- the trainer passes its parallel
strategy's (bf16 autocast under mixed precision, ``rpgrl.parallel.strategy``), the one its
log-prob passes use, so the policy that samples computes like pi_old is scored
(docs/precision.md).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rpgrl.data.verl import Example
from rpgrl.models.kv_cache import decoding_cache
from rpgrl.models.layout import decoding_layout
from rpgrl.models.prefix import call_with_cache, can_share, positions, unwrap
from rpgrl.rewards import score_batch


@dataclass
class RolloutBatch:
    input_ids: Tensor  # [N, P + R]
    attention_mask: Tensor  # [N, P + R]
    prompt_len: int  # P
    response_mask: Tensor  # [N, R] float
    responses: list[str]
    response_lengths: Tensor  # [N] number of valid response tokens
    truncated: Tensor  # [N] bool: hit max_new_tokens without EOS
    #: [N, R] log pi_old(y_t) and the entropy of the tempered distribution at each response token,
    #: from the sampler's own logits (``generate(..., with_logprobs=True)``); 0 off the response mask
    logprobs: Tensor | None = None
    entropy: Tensor | None = None

    @property
    def response_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_len:]

    def digest(self) -> int:
        """A 48-bit fingerprint of the prompts and responses (their token ids and padding):
        two runs drew the same batch iff their digests agree (up to a 2^-48 collision). An
        int below 2^53, so it survives metrics.jsonl's floats exactly."""
        h = hashlib.blake2b(digest_size=6)
        h.update(f"{tuple(self.input_ids.shape)}:{self.prompt_len}".encode())
        h.update(self.input_ids.to(torch.int64).contiguous().numpy().tobytes())
        h.update(self.attention_mask.to(torch.int8).contiguous().numpy().tobytes())
        return int.from_bytes(h.digest(), "big")

    def select(self, indices: list[int] | Tensor) -> "RolloutBatch":
        idx = torch.as_tensor(indices, dtype=torch.long)
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return RolloutBatch(
            self.input_ids[idx], self.attention_mask[idx], self.prompt_len, self.response_mask[idx],
            [self.responses[i] for i in idx.tolist()], self.response_lengths[idx], self.truncated[idx],
            pick(self.logprobs), pick(self.entropy),
        )

    @staticmethod
    def concat(batches: list["RolloutBatch"], pad_id: int = 0) -> "RolloutBatch":
        """Stack batches of different prompt/response widths (re-padding both sides)."""
        if len(batches) == 1:
            return batches[0]
        P = max(b.prompt_len for b in batches)
        R = max(b.input_ids.shape[1] - b.prompt_len for b in batches)
        ids, att, rmask = [], [], []
        scored = all(b.logprobs is not None for b in batches)  # the sampler's log-probs: kept only if all have them
        lps, ents = [], []
        for b in batches:
            left, right = P - b.prompt_len, R - (b.input_ids.shape[1] - b.prompt_len)
            ids.append(F.pad(b.input_ids, (left, right), value=pad_id))
            att.append(F.pad(b.attention_mask, (left, right), value=0))
            rmask.append(F.pad(b.response_mask, (0, right), value=0.0))
            if scored:
                lps.append(F.pad(b.logprobs, (0, right), value=0.0))
                ents.append(F.pad(b.entropy, (0, right), value=0.0))
        return RolloutBatch(
            torch.cat(ids), torch.cat(att), P, torch.cat(rmask),
            [t for b in batches for t in b.responses],
            torch.cat([b.response_lengths for b in batches]), torch.cat([b.truncated for b in batches]),
            torch.cat(lps) if scored else None, torch.cat(ents) if scored else None,
        )


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = eos if isinstance(eos, (list, tuple)) else [eos]
    ids = [int(i) for i in ids if i is not None]
    if not ids:
        raise ValueError("the tokenizer/model defines no EOS token; generation would never stop")
    return ids


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids, mask


#: top-p first looks for the nucleus among the top ``NUCLEUS_K`` tokens (a partial top-k
#: instead of sorting the whole vocabulary); rows whose nucleus is wider fall back to the sort.
NUCLEUS_K = 1024


def sample_tokens(logits: Tensor, temperature: float, top_p: float = 1.0, *, nucleus_k: int = NUCLEUS_K) -> Tensor:
    """One token per row from softmax(logits / temperature), nucleus-truncated to ``top_p``
    (the smallest top set with mass >= top_p; ties kept in sort order); temperature 0 = argmax.

    Nothing else touches the distribution -- no model ``generation_config`` defaults such as
    Qwen-Instruct's repetition_penalty / top_k -- so the sampler is the policy the loss scores.

    Cost at real vocabulary sizes (49k-150k logits per row, every decode step): the full
    softmax draw inverts the float64 CDF of exp(z - max z) with one uniform per row
    (:func:`_race`); top-p sorts only the top ``nucleus_k`` when they already hold top_p of
    the mass (the nucleus is then the same set), else that row is fully sorted.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    if top_p >= 1.0:
        return _draw_softmax(z)
    k = min(int(nucleus_k), z.shape[-1])
    top, order = z.topk(k, dim=-1)  # sorted, descending
    top_p_mass = (top - torch.logsumexp(z, -1, keepdim=True)).exp_()  # softmax(z) of the top k
    cum = top_p_mass.cumsum(-1)
    out = torch.empty(z.shape[:-1], dtype=torch.long, device=z.device)
    inside = cum[..., -1] >= top_p  # the nucleus ends within the top k
    if bool(inside.any()):
        rows = inside.nonzero().squeeze(-1)
        out[rows] = _nucleus_draw(top_p_mass[rows], cum[rows], order[rows], top_p)
    if not bool(inside.all()):
        rows = (~inside).nonzero().squeeze(-1)
        probs = torch.softmax(z[rows], dim=-1)
        sorted_p, full_order = probs.sort(dim=-1, descending=True)
        out[rows] = _nucleus_draw(sorted_p, sorted_p.cumsum(-1), full_order, top_p)
    return out


def _draw_softmax(z: Tensor) -> Tensor:
    """One draw from softmax(z) per row by inverting its CDF with one uniform per row: the
    unnormalised p = exp(z - max z) is summed in float64 (each token's interval is its p to
    ~1e-16), so the cost is one exp and one cumsum over the vocabulary -- no per-token random
    numbers (torch.multinomial draws an Exp(1) per token) and no normalisation pass.
    Zero-probability tokens have empty intervals and are never drawn."""
    return _invert_cdf((z - z.amax(-1, keepdim=True)).exp_())[0]


def _invert_cdf(p: Tensor) -> tuple[Tensor, Tensor]:
    """(one draw per row from the unnormalised ``p``, each row's float64 total)."""
    cdf = p.to(torch.float64).cumsum_(-1)
    u = torch.rand(cdf.shape[:-1] + (1,), dtype=torch.float64, device=p.device) * cdf[..., -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=p.shape[-1] - 1).squeeze(-1), cdf[..., -1]


def sample_with_scores(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """``sample_tokens(logits, temperature)`` (top-p 1: the same numbers, the same draw) and the
    drawn tokens' :func:`token_scores`, sharing the exp over the vocabulary: the scores cost a
    gather and one dot product per row on top of sampling."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    zm = z - z.amax(-1, keepdim=True)
    p = zm.exp()
    tokens, total = _invert_cdf(p)
    log_total = total.log()
    logp = zm.gather(-1, tokens[:, None]).squeeze(-1) - log_total
    entropy = log_total - torch.linalg.vecdot(p, zm) / total
    return tokens, logp, entropy


def token_scores(logits: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(log p(token), entropy of p) per row, p = softmax(logits / temperature) over the full
    vocabulary -- what ``rpgrl.models.logprobs.token_logprobs_from_hidden`` computes for pi_old
    (also under top-p: like verl, pi_old is scored with the full softmax), here from the logits
    the sampler already has: 5 passes over [rows, V] instead of a decoder pass per batch."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # fresh: in-place below is safe
    z -= z.amax(-1, keepdim=True)
    p = z.exp()
    total = p.sum(-1)
    log_total = total.log()
    logp = z.gather(-1, tokens[:, None]).squeeze(-1) - log_total
    entropy = log_total - torch.linalg.vecdot(p, z) / total  # -sum p_i log(p_i / total) / total
    return logp, entropy


def _nucleus_draw(sorted_p: Tensor, cum: Tensor, order: Tensor, top_p: float) -> Tensor:
    """A draw from the descending-sorted probabilities truncated to the nucleus."""
    drop = cum - sorted_p >= top_p  # mass before this token already covers top_p
    pick = torch.multinomial(sorted_p.masked_fill(drop, 0.0), 1)
    return order.gather(-1, pick).squeeze(-1)


def _decode(model, prompt_ids: Tensor, prompt_mask: Tensor, n: int, *, max_new_tokens: int,
            temperature: float, top_p: float, eos_ids: Tensor, pad_id: int,
            compact_at: float = 0.25, with_scores: bool = False,
            share_prefix: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Sample ``n`` continuations of each (distinct) prompt with a KV cache: tokens [U * n, <=
    max_new_tokens] and, ``with_scores``, each token's log-prob and the entropy at it
    (:func:`token_scores`; else None, None).

    Each prompt is prefilled once and its cache repeated for its n samples (``rpgrl.models.prefix``);
    with ``share_prefix``, the prompts' common leading tokens (a chat template's system prompt:
    27 of the study's 49) are prefilled once for all of them (:func:`_shared_columns`). Rows
    that have emitted EOS are dropped from the batch once they are ``compact_at`` of it, so
    long-tailed lengths cost their own tokens, not max_new_tokens for everyone.
    """
    model = unwrap(model)
    pos = positions(prompt_mask)
    c = _shared_columns(prompt_ids, prompt_mask) if share_prefix else 0
    cache = decoding_cache(model, room=max_new_tokens + prompt_ids.shape[1] - c)
    if c:  # the common prefix once, its keys/values repeated for every prompt, then the rest
        call_with_cache(model, cache, input_ids=prompt_ids[:1, :c], attention_mask=prompt_mask[:1, :c],
                        position_ids=pos[:1, :c], keep_last=True)
        cache.batch_repeat_interleave(prompt_ids.shape[0])
    out = call_with_cache(model, cache, input_ids=prompt_ids[:, c:], attention_mask=prompt_mask,
                          position_ids=pos[:, c:], keep_last=True)
    logits = out.logits[:, -1]
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, 0)
    mask = prompt_mask.repeat_interleave(n, 0)
    last = pos[:, -1].repeat_interleave(n, 0)
    total = logits.shape[0]
    tokens = torch.full((total, max_new_tokens), pad_id, dtype=torch.long, device=prompt_ids.device)
    scores = [torch.zeros(total, max_new_tokens, device=prompt_ids.device) for _ in range(2)] if with_scores else None
    rows = torch.arange(total, device=prompt_ids.device)  # original row of each live slot
    done = torch.zeros(total, dtype=torch.bool, device=prompt_ids.device)
    steps = 0
    for step in range(max_new_tokens):
        if scores is not None and top_p >= 1.0:
            nxt, lp, ent = sample_with_scores(logits, temperature)
        else:
            nxt = sample_tokens(logits, temperature, top_p)
            if scores is not None:  # top-p: pi_old is still scored with the full softmax
                lp, ent = token_scores(logits, nxt, temperature)
        nxt.masked_fill_(done, pad_id)
        tokens[rows, step] = nxt
        if scores is not None:
            scores[0][rows, step], scores[1][rows, step] = lp.float(), ent.float()
        steps = step + 1
        real = ~done  # this step's token is part of its response (EOS included)
        done = done | torch.isin(nxt, eos_ids)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()) and float(done.float().mean()) >= compact_at:
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, nxt, real, mask, last = rows[keep], nxt[keep], real[keep], mask[keep], last[keep]
            done = done[keep]
        mask = torch.cat([mask, real.to(mask.dtype)[:, None]], dim=1)
        last = last + 1
        logits = call_with_cache(model, cache, input_ids=nxt[:, None], attention_mask=mask,
                                 position_ids=last[:, None]).logits[:, -1]
    if scores is None:
        return tokens[:, :steps], None, None
    return tokens[:, :steps], scores[0][:, :steps], scores[1][:, :steps]


def _shared_columns(ids: Tensor, mask: Tensor) -> int:
    """Leading columns that are the same real token in every row of a left-padded prompt block
    (0 for one row, or when some row is padded there), at most all but the last: prefilled once,
    they hold the same keys and values for every row (up to float round-off of a smaller
    matmul)."""
    if ids.shape[0] < 2:
        return 0
    same = (ids == ids[:1]).all(0) & mask.bool().all(0)
    c = int(same.int().cumprod(0).sum())
    return min(c, ids.shape[1] - 1)


def _hf_generate(model, ids: Tensor, mask: Tensor, *, max_new_tokens: int, temperature: float,
                 top_p: float, eos_ids: list[int], pad_id: int) -> Tensor:
    """Hugging Face ``generate`` (for models whose cache rpgrl's loop cannot index)."""
    sample = temperature > 0
    kwargs = dict(do_sample=sample, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                  eos_token_id=eos_ids, use_cache=True, repetition_penalty=1.0)
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]


ENGINES = ("auto", "rpgrl", "hf")


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    n: int = 1,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    engine: str = "auto",
    with_logprobs: bool = False,
) -> RolloutBatch:
    """Sample ``n`` responses per prompt (temperature 0 = greedy), grouped contiguously.

    ``with_logprobs`` (temperature > 0, rpgrl's own loop): the batch also carries each response
    token's log-prob and entropy under softmax(logits / temperature), from the logits the
    sampler drew it from (:func:`token_scores`): pi_old's log-probs without another decoder
    pass. Same weights and dtype as the trainer's pass, so they agree to float round-off
    (decoding with a KV cache vs one packed forward; tests/test_rollout.py); HF ``generate``
    returns none (then ``logprobs`` is None).

    ``engine``: ``rpgrl`` = the KV-cached loop above (each prompt prefilled once for its n
    samples, finished rows dropped); ``hf`` = ``model.generate``; ``auto`` = ``rpgrl`` when the
    model's cache is HF's DynamicCache (``rpgrl.models.prefix.can_share``), else ``hf``. Both draw
    from exactly softmax(logits / temperature) [top-p]; with greedy decoding they agree token
    for token (tests/test_rollout.py).
    """
    if not prompts:
        raise ValueError("generate: no prompts")
    if engine not in ENGINES:
        raise ValueError(f"generate: engine must be one of {ENGINES}, got {engine!r}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_ids(model, tokenizer)[0]
    eos_ids = _eos_ids(model, tokenizer)
    expanded = [p for p in prompts for _ in range(n)]
    prompt_ids, prompt_mask = left_pad(expanded, pad_id)
    P = prompt_ids.shape[1]
    was_training = model.training
    model.eval()
    own = engine == "rpgrl" or (engine == "auto" and can_share(model))
    eos_t = torch.tensor(eos_ids, device=device)
    per_call = max(1, batch_size // n)  # whole groups per call
    scored = with_logprobs and own and temperature > 0
    chunks, lp_chunks, ent_chunks = [], [], []
    for start in range(0, len(prompts), per_call):
        rows = slice(start * n, min(len(prompts), start + per_call) * n)
        if own:  # one row per prompt: the loop repeats each prompt's cache n times
            ids = prompt_ids[rows][::n].to(device)
            mask = prompt_mask[rows][::n].to(device)
            out, lp, ent = _decode(model, ids, mask, n, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, eos_ids=eos_t, pad_id=pad_id, with_scores=scored)
            if scored:
                lp_chunks.append(lp.cpu())
                ent_chunks.append(ent.cpu())
        else:
            out = _hf_generate(model, prompt_ids[rows].to(device), prompt_mask[rows].to(device),
                               max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               eos_ids=eos_ids, pad_id=pad_id)
        chunks.append(out.cpu())
    if was_training:
        model.train()
    R = max(c.shape[1] for c in chunks)
    resp = torch.full((len(expanded), R), pad_id, dtype=torch.long)
    produced = torch.zeros((len(expanded), R), dtype=torch.bool)
    row = 0
    for c in chunks:
        resp[row:row + c.shape[0], : c.shape[1]] = c
        produced[row:row + c.shape[0], : c.shape[1]] = True
        row += c.shape[0]
    is_eos = torch.isin(resp, torch.tensor(eos_ids)) & produced
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    response_mask = (produced & (eos_before == 0)).float()
    lengths = response_mask.sum(1).long()
    truncated = ~is_eos.any(dim=1)
    texts = [
        tokenizer.decode(resp[i, : int(lengths[i])].tolist(), skip_special_tokens=True)
        for i in range(len(expanded))
    ]
    input_ids = torch.cat([prompt_ids, resp], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    logprobs = entropy = None
    if scored:
        logprobs, entropy = (_stack_rows(parts, R) * response_mask for parts in (lp_chunks, ent_chunks))
    return RolloutBatch(input_ids, attention_mask, P, response_mask, texts, lengths, truncated, logprobs, entropy)


def _stack_rows(chunks: list[Tensor], width: int) -> Tensor:
    """The generate calls' [rows, steps] blocks, one under the other, right-padded with 0 to ``width``."""
    return torch.cat([F.pad(c, (0, width - c.shape[1])) for c in chunks])


class Sampler:
    """rpgrl's KV-cached loop or HF ``generate`` (``engine``), then the scorer."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, device: torch.device | str = "cpu",
                 engine: str = "auto", batch_size: int = 256, scorer: Callable | None = None,
                 timeout_s: float = 10.0, compute: Callable[[], ContextManager] = contextlib.nullcontext) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.engine, self.batch_size = engine, batch_size
        self.scorer, self.timeout_s, self.compute = scorer, timeout_s, compute

    def sync(self, model: torch.nn.Module) -> None:
        """Sample from ``model``'s current weights from now on."""
        self.model = model

    def decoding(self) -> ContextManager:
        """A phase of sampling calls on unchanged weights (every dynamic-sampling round of a
        step, an evaluation): the model's linear weights held column-major meanwhile, the
        faster layout for decoding's fp32 matmuls on CPU (``rpgrl.models.layout``). Not under
        bf16 mixed precision: autocast casts each weight per call there, and on the on-policy
        recipe the layout gained nothing and cost 0.7 GB (docs/benchmarks.md, section 5)."""
        with self.compute():
            mixed = torch.is_autocast_enabled(torch.device(self.device).type)
        return decoding_layout(self.model, enabled=not mixed)

    def generate(self, prompts: list[list[int]], *, n: int, max_new_tokens: int,
                 temperature: float, top_p: float = 1.0, with_logprobs: bool = False) -> RolloutBatch:
        """``n`` responses per prompt, grouped contiguously (temperature 0 = greedy); with their
        log-probs where the engine has them (``generate``'s ``with_logprobs``)."""
        with self.compute():
            return generate(self.model, self.tokenizer, prompts, n=n, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, batch_size=self.batch_size,
                            device=self.device, engine=self.engine, with_logprobs=with_logprobs)

    def score(self, examples: Sequence[Example], rollout: RolloutBatch, n: int,
              details: list | None = None) -> tuple[list[float], dict]:
        """Scores of the ``n`` responses of each example, and the scorer's counters
        (``details``: see :func:`rpgrl.rewards.score_batch`)."""
        rep = lambda xs: [x for x in xs for _ in range(n)]  # noqa: E731
        return score_batch(rep([e.data_source for e in examples]), rollout.responses,
                           rep([e.ground_truth for e in examples]), rep([e.extra_info for e in examples]),
                           scorer=self.scorer, timeout_s=self.timeout_s, details=details)
