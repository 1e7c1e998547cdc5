"""One step's experience (docs/math.md §7): prompts -> G responses each -> scores, with DAPO's
dynamic sampling (keep groups whose scores differ, generating more rounds if needed) and
overlong shaping. The log-probs and advantages are filled in later by the trainer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import numpy as np
import torch

from rpgrl.loop import metrics as M
from rpgrl.config import Config
from rpgrl.parallel.distributed import DistContext, gather_rounds
from rpgrl.loop.metrics import StepTimer
from rpgrl.loop.prompt_order import PromptOrder
from rpgrl.loop.schedule import old_logp_from_update
from rpgrl.rewards import overlong_penalty
from rpgrl.loop.setup import RunData
from rpgrl.loop.generation import RolloutBatch, Sampler


@dataclass
class Batch:
    """One step's experience: a rollout plus everything computed from it (no grad)."""

    rollout: RolloutBatch
    rewards: torch.Tensor  # [N] shaped rewards
    scores: torch.Tensor  # [N] raw scorer rewards
    group_ids: torch.Tensor  # [N]
    advantages: torch.Tensor | None = None  # [N, R]
    old_logp: torch.Tensor | None = None  # [N, R]
    anchor_logp: torch.Tensor | None = None  # [N, R]; None = rollout anchor
    entropy: torch.Tensor | None = None  # [N, R]
    #: set by the trainer's prepare: pi_old's log-probs (and the entropy) are the update's own
    #: first forward (rpgrl.loop.schedule.old_logp_from_update), not a separate pass
    old_logp_in_update: bool = False


def _rows(groups: list[int], n: int) -> list[int]:
    return [g * n + j for g in groups for j in range(n)]


def wants_sampler_logprobs(cfg: Config, mixed_precision: bool) -> bool:
    """Whether generation should return pi_old's log-probs (``rollout.sampler_logprobs``): only
    when the update would otherwise run a separate pi_old pass (not when pi_old is the update's
    own first forward, ``rpgrl.loop.schedule.old_logp_from_update``, as on-policy), and in fp32
    compute -- under bf16 the decoding and the packed pass round differently at bf16 precision,
    so the pass still runs there."""
    full = cfg.trainer.prompts_per_step * cfg.rollout.n
    return cfg.rollout.sampler_logprobs and not mixed_precision and not old_logp_from_update(cfg, full)


def collect(cfg: Config, sampler: Sampler, data: RunData, order: PromptOrder, dist: DistContext,
            timer: StepTimer, weights: Callable[[], ContextManager]) -> tuple[Batch | None, dict]:
    """Generate and score; with dynamic sampling keep only groups whose scores differ.
    ``weights()``: the context in which the sampler's model holds the weights to sample with."""
    with timer.phase("generation"):
        layout = sampler.decoding()
        layout.__enter__()  # one layout change for all rounds (rpgrl.models.layout)
    try:
        return _collect(cfg, sampler, data, order, dist, timer, weights)
    finally:
        with timer.phase("generation"):
            layout.__exit__(None, None, None)


def _collect(cfg: Config, sampler: Sampler, data: RunData, order: PromptOrder, dist: DistContext,
             timer: StepTimer, weights: Callable[[], ContextManager]) -> tuple[Batch | None, dict]:
    """:func:`collect` inside the sampler's decoding phase."""
    n, want = cfg.rollout.n, cfg.trainer.prompts_per_step
    r, ds = cfg.rollout, cfg.algorithm.dynamic_sampling
    kept: list[tuple[RolloutBatch, list[int], torch.Tensor]] = []
    stats_total: dict[str, float] = {}
    all_scores: list[float] = []
    n_groups, gen_batches, gen_prompt, gen_tokens = 0, 0, 0, 0
    with_logprobs = wants_sampler_logprobs(cfg, data.precision.mixed)
    while True:
        gen_batches += 1
        # every rank draws the same prompts and generates for its own block of them
        indices = dist.shard(order.take(want))
        with timer.phase("generation"), weights():
            rollout = sampler.generate([data.train_prompts[i] for i in indices], n=n,
                                       max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                       with_logprobs=with_logprobs)
        gen_prompt += int(rollout.attention_mask[::n, :rollout.prompt_len].sum())  # MFU: the sampler's work
        gen_tokens += int(rollout.response_mask.sum())
        if gen_batches == 1:  # which batch this step drew: same seed, same first batch (M.FIRST_ROUND_DIGEST)
            first_digest = _global_digest(dist, rollout)
        with timer.phase("scoring"):
            scores, stats = sampler.score([data.train[i] for i in indices], rollout, n)
        for k, v in stats.items():
            if isinstance(v, (int, float)):
                stats_total[k] = stats_total.get(k, 0) + v
        all_scores.extend(scores)
        s = torch.tensor(scores, dtype=torch.float32).view(-1, n)
        groups = list(range(s.shape[0]))
        if ds.enabled:
            groups = [g for g in groups if float(s[g].max() - s[g].min()) > 0]
        kept.append((rollout, groups, s))
        n_groups += len(groups)
        if not ds.enabled:
            break
        # under torchrun every rank stops after the same round: the count is global
        if dist.all_reduce_sum(n_groups) >= want or gen_batches >= ds.max_gen_batches:
            break
    if ds.enabled and dist.enabled:
        rollout, score_t = _agree_on_kept_groups(dist, kept, n, want)
        n_groups = score_t.shape[0]
    metrics = {
        M.FIRST_ROUND_DIGEST: first_digest,
        M.SCORE_MEAN: float(np.mean(all_scores)),
        M.GEN_BATCHES: gen_batches,
        M.KEPT_GROUPS: min(n_groups, want),
        M.GEN_PROMPT_TOKENS: gen_prompt,
        M.GEN_TOKENS: gen_tokens,
        **{f"reward/{k}": v for k, v in stats_total.items()},
    }
    if n_groups == 0:
        return None, metrics
    if not (ds.enabled and dist.enabled):
        parts, scores = [], []
        for rollout, groups, s in kept:  # whole groups, at most `want` of them
            groups = groups[: want - sum(len(sc) for sc in scores)]
            if groups:
                parts.append(rollout if len(groups) == s.shape[0] else rollout.select(_rows(groups, n)))
                scores.append(s[groups])
        rollout = RolloutBatch.concat(parts)
        score_t = torch.cat(scores)
    score_t = score_t.reshape(-1)
    group_ids = torch.arange(score_t.numel()) // n
    rewards = score_t.clone()
    ov = cfg.algorithm.overlong
    if ov.enabled:
        rewards += overlong_penalty(rollout.response_lengths, r.max_new_tokens,
                                    ov.buffer_len, ov.penalty_factor).to(rewards)
    return Batch(rollout, rewards, score_t, group_ids), metrics


def _global_digest(dist: DistContext, rollout: RolloutBatch) -> int:
    """The fingerprint of this round's samples on all ranks together (rank order), the same
    number on every rank; one process: the rollout's own ``digest()``."""
    own = rollout.digest()
    if not dist.enabled:
        return own
    joined = ",".join(str(d) for d in dist.all_gather_object(own))
    return int.from_bytes(hashlib.blake2b(joined.encode(), digest_size=6).digest(), "big")


def _agree_on_kept_groups(dist: DistContext, kept: list, n: int, want: int) -> tuple[RolloutBatch | None, torch.Tensor]:
    """Dynamic sampling under torchrun: every rank gathers every rank's kept groups (in
    prompt order: round by round, rank by rank), takes the first ``want``, trims them to a
    multiple of the world size and keeps its own contiguous block, so all ranks hold the
    same number of groups (hence take the same number of optimizer steps) and together
    the groups a single process would have kept from the same responses. Returns this
    rank's rollout and its [groups, n] scores (no groups: an empty score tensor)."""
    mine = [(r.select(_rows(groups, n)), s[groups]) if groups else None for r, groups, s in kept]
    parts = [p for p in gather_rounds(dist, mine) if p is not None]
    if not parts:
        return None, torch.zeros(0, n)
    rollout, scores = RolloutBatch.concat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    total = min(scores.shape[0], want)
    total -= total % dist.world_size
    groups = dist.shard(list(range(total)))
    return rollout.select(_rows(groups, n)), scores[groups]
