"""The online RL loop (spec sections 1 and 7), one pass down the data flow per step:

    prompts -> generate G each -> score (+ dynamic sampling, overlong shaping)
            -> advantages -> log-probs of pi_old (once, no grad) and of the anchor
            -> epochs x mini-batches x micro-batches of policy_loss updates -> metrics/checkpoint

The math lives in ``rpgrl.losses`` / ``rpgrl.advantages``; this module only orders the calls.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rpgrl.anchor import Anchor
from rpgrl.checkpoint import (capture_rng_state, find_latest_checkpoint, load_checkpoint,
                              restore_rng_state, save_checkpoint)
from rpgrl.config import Config, dump_yaml, to_dict
from rpgrl.distributed import (check_world_size, gather_rounds, global_advantages, init_distributed,
                               rank_seed)
from rpgrl.fsdp import (FsdpCheckpointView, FullWeights, fsdp_full_state, fsdp_load_full_state,
                        fsdp_unsharded, logprobs_fn, shape_free_keys, shard_policy)
from rpgrl.kl import kl_penalty
from rpgrl.losses import aggregation_count, policy_loss
from rpgrl.optim import build_optimizer, clip_and_check, eval_mode
from rpgrl.rewards import overlong_penalty, score_batch
from rpgrl.rollout import RolloutBatch, generate
from rpgrl.run_setup import RunData, setup_run
from rpgrl.sampler import EpochSampler
from rpgrl.tracking import Tracker
from rpgrl.evaluate import BestLastTracker, flatten
from rpgrl.eval_runner import evaluate_policy


#: Metrics summed over ranks (counts, and the loss: each rank's part shares the global
#: denominator); every other metric is averaged, except these maxima.
_SUM_METRICS = ("actor/loss", "batch/kept_groups", "reward/n", "reward/scorer_", "reward/empty_")
_MAX_METRICS = ("response_length/max",)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many consecutive non-finite steps)."""


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


class StepTimer:
    """Seconds per phase of a step (trainer.profile / the overhead bar of the benchmarks)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class Trainer:
    def __init__(self, cfg: Config, *, resume: bool = False, log=print) -> None:
        self._t_start = time.perf_counter()  # wall time includes the warm start and model load
        # under torchrun: one data-parallel replica per process (rpgrl.distributed)
        self.dist = init_distributed(cfg.trainer.device)
        check_world_size(cfg, self.dist.world_size)
        self.cfg, self.log = cfg, (log if self.dist.is_main else _quiet)
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.trainer.num_threads:
            torch.set_num_threads(cfg.trainer.num_threads)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.data: RunData
        with self.dist.main_first():  # rank 0 fills the warm-start cache, the others reuse it
            self.data, self.model, self.tokenizer, self.device = setup_run(cfg, log=self.log)
        if self.dist.enabled:
            if self.device.type == "cuda":
                self.device = self.dist.device
            self.dist.broadcast_module(self.model)
            s = rank_seed(cfg.seed, self.dist.rank)  # each rank samples its own responses
            random.seed(s)
            np.random.seed(s)
            torch.manual_seed(s)
        a = cfg.algorithm.anchor  # the anchor snapshot is a plain replica, taken before sharding
        self.anchor = Anchor.create(a.mode, self.model, period=a.period, kappa=a.kappa, ema=a.ema)
        self.fsdp = cfg.trainer.fsdp and self.dist.enabled
        if self.fsdp:  # FSDP2 replaces the manual all-reduce; the optimizer sees the shards
            shard_policy(self.model)
        self.optimizer, self.scheduler = build_optimizer(
            self.model, cfg.optim.name, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
            warmup_steps=cfg.optim.warmup_steps,
        )
        self.sampler = EpochSampler(len(self.data.train), cfg.seed)
        self.timer = StepTimer()
        self.step_count = 0
        self.consecutive_skips = 0
        self.skipped_total = 0
        self.eval_before: dict | None = None
        self.best_last = BestLastTracker()
        resumed = self._resume() if resume else False
        self.tracker = _NoTracker()
        if self.dist.is_main:
            self.tracker = Tracker(
                self.out, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                wandb_project=cfg.logging.wandb_project, run_name=cfg.logging.run_name,
                config=to_dict(cfg),
                resume_step=self.step_count if resumed else None,
            )
            (self.out / "config.yaml").write_text(dump_yaml(cfg))

    # ------------------------------------------------------------------ experience

    def _generate(self, indices: list[int]) -> tuple[RolloutBatch, list[float], dict]:
        cfg, ex = self.cfg, [self.data.train[i] for i in indices]
        prompts = [self.data.train_prompts[i] for i in indices]
        with self.timer.phase("generation"), fsdp_unsharded(self.model):
            rollout = generate(
                self.model, self.tokenizer, prompts, n=cfg.rollout.n,
                max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                top_p=cfg.rollout.top_p, batch_size=cfg.rollout.batch_size, device=self.device,
                engine=cfg.rollout.engine,
            )
        n = cfg.rollout.n
        with self.timer.phase("scoring"):
            scores, stats = score_batch(
                [e.data_source for e in ex for _ in range(n)], rollout.responses,
                [e.ground_truth for e in ex for _ in range(n)],
                [e.extra_info for e in ex for _ in range(n)],
                scorer=self.data.scorer, timeout_s=cfg.reward_timeout_s,
            )
        return rollout, scores, stats

    def collect(self) -> tuple[Batch | None, dict]:
        """Generate and score; with dynamic sampling keep only groups whose scores differ."""
        cfg = self.cfg
        n, want = cfg.rollout.n, cfg.trainer.prompts_per_step
        ds = cfg.algorithm.dynamic_sampling
        kept: list[tuple[RolloutBatch, list[int], torch.Tensor]] = []
        stats_total: dict[str, float] = {}
        all_scores: list[float] = []
        n_groups, gen_batches = 0, 0
        while True:
            gen_batches += 1
            # every rank draws the same prompts and generates for its own block of them
            rollout, scores, stats = self._generate(self.dist.shard(self.sampler.take(want)))
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
            if self.dist.all_reduce_sum(n_groups) >= want or gen_batches >= ds.max_gen_batches:
                break
        if ds.enabled and self.dist.enabled:
            rollout, score_t = self._agree_on_kept_groups(kept, want)
            n_groups = score_t.shape[0]
        metrics = {
            "reward/score_mean": float(np.mean(all_scores)),
            "batch/gen_batches": gen_batches,
            "batch/kept_groups": min(n_groups, want),
            **{f"reward/{k}": v for k, v in stats_total.items()},
        }
        if n_groups == 0:
            return None, metrics
        if not (ds.enabled and self.dist.enabled):
            parts, scores = [], []
            for rollout, groups, s in kept:  # whole groups, at most `want` of them
                groups = groups[: want - sum(len(sc) for sc in scores)]
                if groups:
                    all_kept = len(groups) == s.shape[0]
                    parts.append(rollout if all_kept else rollout.select([g * n + j for g in groups for j in range(n)]))
                    scores.append(s[groups])
            rollout = RolloutBatch.concat(parts)
            score_t = torch.cat(scores)
        score_t = score_t.reshape(-1)
        group_ids = torch.arange(score_t.numel()) // n
        rewards = score_t.clone()
        ov = cfg.algorithm.overlong
        if ov.enabled:
            rewards += overlong_penalty(rollout.response_lengths, cfg.rollout.max_new_tokens,
                                        ov.buffer_len, ov.penalty_factor).to(rewards)
        return Batch(rollout, rewards, score_t, group_ids), metrics

    def _agree_on_kept_groups(self, kept: list, want: int) -> tuple[RolloutBatch, torch.Tensor]:
        """Dynamic sampling under torchrun: every rank gathers every rank's kept groups (in
        prompt order: round by round, rank by rank), takes the first ``want``, trims them to a
        multiple of the world size and keeps its own contiguous block, so all ranks hold the
        same number of groups (hence take the same number of optimizer steps) and together
        the groups a single process would have kept from the same responses. Returns this
        rank's rollout and its [groups, n] scores (no groups: an empty score tensor)."""
        n = self.cfg.rollout.n
        mine = [(r.select([g * n + j for g in groups for j in range(n)]), s[groups]) if groups else None
                for r, groups, s in kept]
        parts = [p for p in gather_rounds(self.dist, mine) if p is not None]
        if not parts:
            return None, torch.zeros(0, n)
        rollout, scores = RolloutBatch.concat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        total = min(scores.shape[0], want)
        total -= total % self.dist.world_size
        groups = self.dist.shard(list(range(total)))
        return rollout.select([g * n + j for g in groups for j in range(n)]), scores[groups]

    @torch.no_grad()
    def _logprobs(self, model, rollout: RolloutBatch, with_entropy: bool = False):
        parts_lp, parts_ent = [], []
        bs = self.cfg.trainer.micro_batch_size
        for s in range(0, rollout.input_ids.shape[0], bs):
            lp, ent = logprobs_fn(model)(
                rollout.input_ids[s:s + bs].to(self.device),
                rollout.attention_mask[s:s + bs].to(self.device), rollout.prompt_len,
                chunk_size=self.cfg.trainer.logprob_chunk_size, with_entropy=with_entropy,
                temperature=self.cfg.rollout.temperature, share_prompts=self.cfg.trainer.share_prompts,
            )
            parts_lp.append(lp.float().cpu())
            if ent is not None:
                parts_ent.append(ent.float().cpu())
        return torch.cat(parts_lp), (torch.cat(parts_ent) if parts_ent else None)

    def prepare(self, batch: Batch) -> None:
        """pi_old log-probs once per batch, anchor log-probs per anchor mode, advantages."""
        a = self.cfg.algorithm
        with self.timer.phase("logprobs"):
            if not self._old_logp_from_update(batch):
                batch.old_logp, batch.entropy = self._logprobs(self.model, batch.rollout, with_entropy=True)
            self.anchor.maybe_refresh(FullWeights(self.model) if self.fsdp else self.model)
            if not self.anchor.uses_rollout:
                batch.anchor_logp, _ = self._logprobs(self.anchor.model, batch.rollout)
        mask = batch.rollout.response_mask
        token_kl = None
        if a.kl_in_reward > 0:
            ref = batch.anchor_logp if batch.anchor_logp is not None else batch.old_logp
            token_kl = kl_penalty(batch.old_logp, ref, kind="k1") * mask
        batch.advantages = global_advantages(
            self.dist, a.advantage, batch.rewards, batch.group_ids, mask, token_kl=token_kl,
            kl_coef=a.kl_in_reward,
        )

    def _num_mini_batches(self, n_seq: int) -> int:
        cfg = self.cfg
        return max(1, min(cfg.trainer.prompts_per_step // cfg.trainer.mini_batch_size, n_seq // cfg.rollout.n))

    def _old_logp_from_update(self, batch: Batch) -> bool:
        """Whether pi_old's log-probs are exactly the update's own first forward (no extra pass).

        True when the batch gets a single optimizer step (one epoch, one mini-batch: every
        micro-batch sees the rollout weights), generation used the training weights (not
        Schedule-Free, whose sampler is its averaged iterate) and no KL is folded into the
        reward (that needs them before the advantages). Then w = 1 exactly, as on-policy.
        """
        cfg = self.cfg
        return (cfg.trainer.epochs == 1 and self._num_mini_batches(batch.rollout.input_ids.shape[0]) == 1
                and cfg.optim.name != "schedulefree_adamw" and cfg.algorithm.kl_in_reward == 0)

    # ------------------------------------------------------------------ update

    def update(self, batch: Batch) -> dict[str, float]:
        """epochs x mini-batches x micro-batches; the loss is normalised over each mini-batch."""
        cfg, a = self.cfg, self.cfg.algorithm
        n_seq = batch.rollout.input_ids.shape[0]
        n_mini = self._num_mini_batches(n_seq)
        fill_old = batch.old_logp is None  # see _old_logp_from_update
        if fill_old:
            batch.old_logp = torch.zeros_like(batch.rollout.response_mask)
            batch.entropy = torch.zeros_like(batch.rollout.response_mask)
        clip = (a.clip_low, a.clip_high)
        sums: dict[str, float] = {}
        counts = 0
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.step_count)
        # per epoch, shuffle the sequences; mini-batches then split the shuffled order
        schedule = [mb for _ in range(cfg.trainer.epochs)
                    for mb in torch.tensor_split(torch.randperm(n_seq, generator=gen), n_mini)]
        for i_mb, mb in enumerate(schedule):
            mask_mb = batch.rollout.response_mask[mb]
            # spec Sec. 6: the loss is normalised by the global mini-batch's count
            norm = self.dist.all_reduce_sum(float(aggregation_count(mask_mb, a.agg)))
            self.optimizer.zero_grad(set_to_none=True)
            kl_mb = 0.0
            for micro in torch.split(mb, cfg.trainer.micro_batch_size):
                with self.timer.phase("forward_backward"):
                    r = batch.rollout
                    logp, entropy = logprobs_fn(self.model)(
                        r.input_ids[micro].to(self.device),
                        r.attention_mask[micro].to(self.device), r.prompt_len,
                        chunk_size=cfg.trainer.logprob_chunk_size, with_entropy=fill_old,
                        temperature=cfg.rollout.temperature, share_prompts=cfg.trainer.share_prompts,
                    )
                    if fill_old:
                        batch.old_logp[micro] = logp.detach().float().cpu()
                        batch.entropy[micro] = entropy.float().cpu()
                    def dev(t, rows=micro):
                        return None if t is None else t[rows].to(self.device)

                    loss, m = policy_loss(
                        a.loss, logp.float(), dev(batch.old_logp), dev(batch.advantages),
                        dev(r.response_mask), anchor_logp=dev(batch.anchor_logp), beta=a.beta,
                        clip=clip, dual_clip=a.clip_c, agg=a.agg,
                        kl_in_advantage=a.kl_in_advantage, norm=max(norm, 1.0),
                    )
                    loss.backward()
                # loss metrics are token-means of each micro-batch: weight them by its tokens
                w = float(r.response_mask[micro].sum()) / max(float(mask_mb.sum()), 1.0)
                share = 1.0 / (cfg.trainer.epochs * n_mini)  # metrics: mean over optimizer steps
                sums["actor/loss"] = sums.get("actor/loss", 0.0) + float(loss.detach()) * share
                for k, v in m.items():
                    key = f"actor/{k}"
                    if k.endswith("_max"):
                        sums[key] = max(sums.get(key, float("-inf")), float(v))
                    else:
                        sums[key] = sums.get(key, 0.0) + float(v) * w * share
                kl_mb += float(m["kl_anchor_k3"]) * w
            with self.timer.phase("optimizer"):
                grad_norm = self._apply_gradients()
                self.anchor.observe(self.dist.mean(kl_mb))  # this mini-batch's KL to the anchor
            if self.anchor.due and i_mb + 1 < len(schedule):
                self._refresh_anchor_mid_batch(batch, torch.cat(schedule[i_mb + 1:]).unique())
            counts += 1
            sums["actor/grad_norm"] = sums.get("actor/grad_norm", 0.0) + (
                grad_norm if math.isfinite(grad_norm) else 0.0) / (n_mini * cfg.trainer.epochs)
        sums["actor/skipped_steps_total"] = self.skipped_total
        sums["actor/optimizer_steps"] = counts
        return sums

    def _refresh_anchor_mid_batch(self, batch: Batch, rows: torch.Tensor) -> None:
        """A refresh due after an optimizer step that is not the batch's last (K counts
        optimizer steps, spec 1.1): snapshot the policy now and recompute the anchor
        log-probs of the ``rows`` the remaining mini-batches use. The advantages (and a KL
        folded into the reward) keep the anchor of the batch start."""
        with self.timer.phase("logprobs"), eval_mode(self.optimizer):
            self.anchor.maybe_refresh(FullWeights(self.model) if self.fsdp else self.model)
            batch.anchor_logp[rows] = self._logprobs(self.anchor.model, batch.rollout.select(rows))[0]

    def _apply_gradients(self) -> float:
        """Global grad -> clip -> optimizer step, or skip a non-finite step (spec Sec. 7)."""
        cfg = self.cfg
        if not self.fsdp:  # FSDP2 has reduce-scattered (summed) them in backward
            self.dist.all_reduce_grads(self.model.parameters())  # clip sees the global grad
        grad_norm, finite = clip_and_check(self.model.parameters(), cfg.optim.grad_clip)
        if finite:
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.consecutive_skips = 0
            return grad_norm
        self.optimizer.zero_grad(set_to_none=True)
        self.consecutive_skips += 1
        self.skipped_total += 1
        self.log(f"step {self.step_count + 1}: non-finite gradient norm, "
                 f"optimizer step skipped ({self.consecutive_skips} in a row)")
        if self.consecutive_skips >= cfg.trainer.max_consecutive_skips:
            raise TrainingError(
                f"{self.consecutive_skips} consecutive optimizer steps had a non-finite "
                f"loss or gradient (trainer.max_consecutive_skips="
                f"{cfg.trainer.max_consecutive_skips}). Look at: the learning rate "
                "(optim.lr), the reward scale, rollout.temperature, and the dtype "
                "(model.dtype). The last good checkpoint is in "
                f"{self.out / 'checkpoints'}."
            )
        return grad_norm

    # ------------------------------------------------------------------ step / loop

    def step(self) -> dict[str, float]:
        self.timer = StepTimer()
        start = time.perf_counter()
        with eval_mode(self.optimizer):
            batch, metrics = self.collect()
            if batch is not None:
                self.prepare(batch)
        if batch is not None:
            metrics.update(self.update(batch))
            mask = batch.rollout.response_mask
            metrics.update({
                "reward/mean": float(batch.rewards.mean()),
                "reward/accuracy": float((batch.scores > 0.5).float().mean()),
                "response_length/mean": float(batch.rollout.response_lengths.float().mean()),
                "response_length/max": float(batch.rollout.response_lengths.max()),
                "response_length/clip_ratio": float(batch.rollout.truncated.float().mean()),
                "actor/entropy": float((batch.entropy * mask).sum() / mask.sum().clamp(min=1)),
                "anchor/refreshes": self.anchor.refreshes,
            })
        self.step_count += 1
        total = time.perf_counter() - start
        timing = {f"timing/{k}": v for k, v in self.timer.seconds.items()}
        timing["timing/step"] = total
        timing["timing/other"] = total - sum(self.timer.seconds.values())
        metrics.update(timing)
        metrics["optim/lr"] = float(self.optimizer.param_groups[0]["lr"])
        return self.dist.reduce_metrics(metrics, sum_prefixes=_SUM_METRICS, max_keys=_MAX_METRICS)

    def evaluate(self) -> dict:
        cfg = self.cfg
        with eval_mode(self.optimizer):
            return evaluate_policy(
                self.model, self.tokenizer, self.data.test, self.data.test_prompts,
                k=cfg.eval.k, temperature=cfg.eval.temperature,
                max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                max_problems=cfg.eval.max_problems, batch_size=cfg.rollout.batch_size,
                device=self.device, scorer=self.data.scorer, timeout_s=cfg.reward_timeout_s,
                engine=cfg.rollout.engine,
            )

    def _log_eval(self, result: dict, step: int) -> None:
        flat = {"eval/accuracy": result["accuracy"]}
        flat.update({f"eval/{k}": v for k, v in flatten(result).items()})
        self.best_last.update(step, flat)
        self.tracker.log(flat, step=step)

    def save(self) -> Path | None:
        """Rank 0 writes the (replicated) model once, with every rank's RNG state; returns
        the checkpoint directory there and None on the other ranks."""
        rng_per_rank = self.dist.all_gather_object(capture_rng_state()) if self.dist.enabled else None
        state = {
            "step": self.step_count,
            "sampler": self.sampler.state_dict(),
            "rng": capture_rng_state(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "anchor": self.anchor.state_dict(),
            "skipped_total": self.skipped_total,
            "consecutive_skips": self.consecutive_skips,
            "eval_before": json.dumps(self.eval_before),
            "best_last": json.dumps(self.best_last.to_dict()),
        }
        if rng_per_rank is not None:
            state["rng_per_rank"] = rng_per_rank
        model, optimizer = self.model, self.optimizer
        if self.fsdp:  # gathered on rank 0 and written in the unsharded format
            sd, osd = fsdp_full_state(self.model, self.optimizer)
            model, optimizer = FsdpCheckpointView(sd), FsdpCheckpointView(osd)
        path = None
        if self.dist.is_main:
            path = save_checkpoint(self.out, self.step_count, model, optimizer, state,
                                   keep_last=self.cfg.trainer.keep_last)
        self.dist.barrier()  # no rank runs ahead of (or exits before) a finished checkpoint
        return path

    def _resume(self) -> bool:
        path = self.dist.broadcast_object(find_latest_checkpoint(self.out) if self.dist.is_main else None)
        if path is None:
            self.log(f"--resume: no complete checkpoint under {self.out / 'checkpoints'}; starting fresh")
            return False
        if self.fsdp:  # every rank reads the full file and keeps its shards
            model = FsdpCheckpointView(expected=shape_free_keys(self.model))
            optimizer = FsdpCheckpointView()
            state = load_checkpoint(path, model, optimizer)
            fsdp_load_full_state(self.model, self.optimizer, model.loaded, optimizer.loaded)
        else:
            state = load_checkpoint(path, self.model, self.optimizer)
        self.step_count = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        if self.scheduler is not None and state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        self.anchor.load_state_dict(state["anchor"])
        self.skipped_total = int(state["skipped_total"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.eval_before = json.loads(state["eval_before"])
        self.best_last = BestLastTracker.from_dict(json.loads(state["best_last"]))
        rng = self._rank_rng(state)
        if rng is not None:
            restore_rng_state(rng)
        self.log(f"resumed from {path} at step {self.step_count}")
        return True

    def _rank_rng(self, state: dict) -> dict | None:
        if not self.dist.enabled:
            return state["rng"]
        per_rank = state.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == self.dist.world_size:
            return per_rank[self.dist.rank]
        self.log(f"--resume: the checkpoint holds RNG states for {len(per_rank or [1])} process(es), "
                 f"this run has {self.dist.world_size}; sampling continues from fresh per-rank seeds")
        s = rank_seed(self.cfg.seed + self.step_count, self.dist.rank)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)  # also seeds every CUDA device
        return None  # nothing to restore: every stream was just seeded for this rank

    def train(self) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        main = self.dist.is_main  # rank 0 evaluates, logs and writes; the others wait
        if self.eval_before is None and cfg.eval.before_training:
            # all ranks switch and gather (no-ops without Schedule-Free / FSDP); rank 0 evaluates
            with eval_mode(self.optimizer), fsdp_unsharded(self.model):
                if main:
                    self.eval_before = self.evaluate()
                    self.log(f"held-out accuracy before RL: {self.eval_before['accuracy']:.3f}")
                    self._log_eval(self.eval_before, step=0)
        progress = _progress(cfg.trainer.total_steps, self.step_count, cfg.logging.progress and main)
        try:
            while self.step_count < cfg.trainer.total_steps:
                metrics = self.step()
                self.tracker.log(metrics, step=self.step_count)
                progress.update(1)
                progress.set_postfix({
                    "reward": f"{metrics.get('reward/mean', float('nan')):.3f}",
                    "acc": f"{metrics.get('reward/accuracy', float('nan')):.2f}",
                    "kl": f"{metrics.get('actor/kl_anchor_k3', float('nan')):.1e}",
                    "ent": f"{metrics.get('actor/entropy', float('nan')):.2f}",
                    "len": f"{metrics.get('response_length/mean', float('nan')):.1f}",
                })
                if cfg.trainer.eval_every and self.step_count % cfg.trainer.eval_every == 0 \
                        and self.step_count < cfg.trainer.total_steps:
                    with eval_mode(self.optimizer), fsdp_unsharded(self.model):
                        if main:
                            self._log_eval(self.evaluate(), step=self.step_count)
                if self.step_count % cfg.trainer.save_every == 0 or self.step_count == cfg.trainer.total_steps:
                    self.save()
        finally:
            progress.close()
        final_sd = None
        if self.fsdp:
            with eval_mode(self.optimizer):  # the weights one evaluates with, as save_final
                final_sd = fsdp_full_state(self.model)[0]
        with eval_mode(self.optimizer), fsdp_unsharded(self.model):
            summary = self._finish(t0, final_sd) if main else None
        return self.dist.broadcast_object(summary)  # also keeps the others until rank 0 is done

    def _finish(self, t0: float, final_sd: dict | None = None) -> dict:
        """Final evaluation, final/ model, curves.png and summary.json (rank 0 only);
        ``final_sd``: the gathered full weights of an FSDP-sharded policy."""
        cfg = self.cfg
        eval_after = self.evaluate()
        self._log_eval(eval_after, step=self.step_count)
        self.tracker.close()
        from rpgrl.models import save_final
        from rpgrl.plots import plot_curves

        if final_sd is not None:  # FSDP: the module holds shards, write the gathered weights
            self.model.save_pretrained(str(self.out / "final"), state_dict=final_sd, safe_serialization=True)
            self.tokenizer.save_pretrained(str(self.out / "final"))
        else:
            with eval_mode(self.optimizer):
                save_final(self.model, self.tokenizer, self.out / "final")
        plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")
        if cfg.trainer.profile:
            self.log(_profile_table(self.out / "metrics.jsonl"))
        summary = {
            "eval_before": {"accuracy": (self.eval_before or {}).get("accuracy", float("nan"))},
            "eval_after": {"accuracy": eval_after["accuracy"]},
            "wall_seconds": time.perf_counter() - self._t_start,
            "train_seconds": time.perf_counter() - t0,
            "steps": self.step_count,
            "algorithm": cfg.algorithm.name,
            "eval_best_last": self.best_last.to_dict(),
            "skipped_steps": self.skipped_total,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def _profile_table(metrics_path: Path) -> str:
    """trainer.profile: mean seconds per phase over steps 2..N (step 1 carries warm-up costs)."""
    from rpgrl.tracking import read_metrics

    rows = [r for r in read_metrics(metrics_path) if "timing/step" in r and r["step"] > 1]
    if not rows:
        return "profile: fewer than 2 steps, nothing to report"
    keys = sorted({k for r in rows for k in r if k.startswith("timing/")})
    means = {k: float(np.mean([r.get(k, 0.0) for r in rows])) for k in keys}
    step = means.pop("timing/step")
    lines = [f"step-time breakdown (mean over steps 2..{rows[-1]['step']}):"]
    lines += [f"  {k[7:]:<18}{v:8.4f} s {100 * v / step:5.1f} %" for k, v in sorted(means.items(), key=lambda kv: -kv[1])]
    lines.append(f"  {'step':<18}{step:8.4f} s")
    return "\n".join(lines)


def _quiet(*_a, **_k) -> None:
    pass


class _NoTracker:
    """Ranks other than 0 log nothing (metrics are reduced to rank 0 first)."""

    def log(self, metrics, step): ...
    def close(self): ...


class _NoProgress:
    def update(self, n): ...
    def set_postfix(self, d): ...
    def close(self): ...


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="rpgrl train", dynamic_ncols=True)
