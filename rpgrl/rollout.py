"""Generation with a Hugging Face model (KV cache) into one padded batch.

Layout of the returned batch, shared with ``rpgrl.logprobs.sequence_logprobs``:
``input_ids = [left-padded prompt (P) | right-padded response (R)]``. The response mask
covers generated tokens up to and including the first EOS.

The sampler must be the policy whose log-probs the loss uses: sampling is plain
softmax(logits / temperature) with top-k disabled (HF's default top_k=50 would silently
make pi_old differ from what we score). ``top_p < 1`` truncates the sampler; like verl we
then still score with the full softmax, which the docs call out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class RolloutBatch:
    input_ids: Tensor  # [N, P + R]
    attention_mask: Tensor  # [N, P + R]
    prompt_len: int  # P
    response_mask: Tensor  # [N, R] float
    responses: list[str]
    response_lengths: Tensor  # [N] number of valid response tokens
    truncated: Tensor  # [N] bool: hit max_new_tokens without EOS

    @property
    def response_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_len:]

    def select(self, indices: list[int] | Tensor) -> "RolloutBatch":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return RolloutBatch(
            self.input_ids[idx], self.attention_mask[idx], self.prompt_len, self.response_mask[idx],
            [self.responses[i] for i in idx.tolist()], self.response_lengths[idx], self.truncated[idx],
        )

    @staticmethod
    def concat(batches: list["RolloutBatch"], pad_id: int = 0) -> "RolloutBatch":
        """Stack batches of different prompt/response widths (re-padding both sides)."""
        if len(batches) == 1:
            return batches[0]
        P = max(b.prompt_len for b in batches)
        R = max(b.input_ids.shape[1] - b.prompt_len for b in batches)
        ids, att, rmask = [], [], []
        for b in batches:
            left, right = P - b.prompt_len, R - (b.input_ids.shape[1] - b.prompt_len)
            ids.append(F.pad(b.input_ids, (left, right), value=pad_id))
            att.append(F.pad(b.attention_mask, (left, right), value=0))
            rmask.append(F.pad(b.response_mask, (0, right), value=0.0))
        return RolloutBatch(
            torch.cat(ids), torch.cat(att), P, torch.cat(rmask),
            [t for b in batches for t in b.responses],
            torch.cat([b.response_lengths for b in batches]), torch.cat([b.truncated for b in batches]),
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
) -> RolloutBatch:
    """Sample ``n`` responses per prompt (temperature 0 = greedy), grouped contiguously."""
    if not prompts:
        raise ValueError("generate: no prompts")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_ids(model, tokenizer)[0]
    eos_ids = _eos_ids(model, tokenizer)
    expanded = [p for p in prompts for _ in range(n)]
    prompt_ids, prompt_mask = left_pad(expanded, pad_id)
    P = prompt_ids.shape[1]
    sample = temperature > 0
    kwargs = dict(
        do_sample=sample, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
        eos_token_id=eos_ids, use_cache=True,
    )
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(expanded), batch_size):
        ids = prompt_ids[start:start + batch_size].to(device)
        mask = prompt_mask[start:start + batch_size].to(device)
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        chunks.append(out[:, P:].cpu())
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
    return RolloutBatch(input_ids, attention_mask, P, response_mask, texts, lengths, truncated)
