"""How the update consumes one batch (docs/math.md §7): ``epochs`` passes over the shuffled
sequences, each split into mini-batches of one optimizer step each; and whether pi_old's
log-probs can be that update's own first forward instead of a separate pass."""

from __future__ import annotations

import torch

from rpgrl.config import Config

__all__ = ["SHUFFLE_SEED_STRIDE", "mini_batch_schedule", "num_mini_batches", "old_logp_from_update"]

#: Step ``k``'s shuffle draws from its own generator seeded ``seed * SHUFFLE_SEED_STRIDE + k``:
#: not the global RNG (the number of epochs and mini-batches leaves sampling untouched) and a
#: function of (seed, step) only (a resumed run reshuffles identically, nothing to save). The
#: stride (a prime, the 1000th) keeps runs of different seeds on different streams for their
#: first 7919 steps; with a stride of 1, seed 1's step 0 would reuse seed 0's step 1.
SHUFFLE_SEED_STRIDE = 7919


def num_mini_batches(cfg: Config, n_seq: int) -> int:
    """Optimizer steps per epoch: prompts_per_step / mini_batch_prompts, fewer when dynamic
    sampling kept fewer groups (``n_seq // rollout.n``), at least one."""
    t = cfg.trainer
    return max(1, min(t.prompts_per_step // t.mini_batch_prompts, n_seq // cfg.rollout.n))


def mini_batch_schedule(n_seq: int, n_mini: int, epochs: int, *, seed: int, step: int) -> list[torch.Tensor]:
    """The rows of each optimizer step, in order: per epoch a fresh permutation of the
    ``n_seq`` sequences, split into ``n_mini`` contiguous mini-batches."""
    gen = torch.Generator().manual_seed(seed * SHUFFLE_SEED_STRIDE + step)
    return [mb for _ in range(epochs) for mb in torch.tensor_split(torch.randperm(n_seq, generator=gen), n_mini)]


def old_logp_from_update(cfg: Config, n_seq: int) -> bool:
    """Whether pi_old's log-probs are exactly the update's own first forward (no extra pass).

    True when the batch gets a single optimizer step (one epoch, one mini-batch: every
    micro-batch sees the rollout weights), generation used the training weights (not
    Schedule-Free, whose sampler is its averaged iterate) and no KL is folded into the
    reward (that needs them before the advantages). Then w = 1 exactly, as on-policy.
    """
    return (cfg.trainer.epochs == 1 and num_mini_batches(cfg, n_seq) == 1
            and cfg.optim.name != "schedulefree_adamw" and cfg.algorithm.kl_in_reward == 0)
