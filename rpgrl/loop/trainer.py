"""The online RL loop (docs/math.md §1 and §7), one pass down the data flow per step:

    prompts -> generate G each -> score (+ dynamic sampling, overlong shaping)   rpgrl.loop.collect
            -> advantages -> log-probs of pi_old (once, no grad) and of the anchor
            -> epochs x mini-batches x micro-batches of loss updates -> metrics/checkpoint

The math lives in ``rpgrl.losses`` / ``rpgrl.algorithm.advantages``; how the policy is spread over
processes in ``rpgrl.parallel.strategy``; sampling in ``rpgrl.loop.generation``; which rows each optimizer step
uses in ``rpgrl.loop.schedule``; what carries over between steps (and into checkpoints) in
``rpgrl.loop.train_state``. This module orders the calls.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from rpgrl.loop import metrics as M
from rpgrl.algorithm.advantages import global_advantages
from rpgrl.algorithm.anchor import Anchor
from rpgrl.loop.checkpoint import seed_all
from rpgrl.config import Config, check_world_size, dump_yaml, to_dict
from rpgrl.parallel.distributed import init_distributed, rank_seed
from rpgrl.loop.evaluation import evaluate_with
from rpgrl.loop.eval_metrics import flatten
from rpgrl.loop.collect import Batch, collect
from rpgrl.models.flops import PhaseFlops, matmul_peaks, peak_for
from rpgrl.algorithm.kl import kl_penalty
from rpgrl.losses import KL_SHARE_KEYS, METRIC_KEYS, BoundLoss, aggregation_count
from rpgrl.loop.metrics import StepTimer
from rpgrl.loop.optim import build_optimizer, clip_and_step, eval_mode
from rpgrl.parallel.strategy import make_parallel
from rpgrl.loop.prompt_order import PromptOrder
from rpgrl.loop.generation import RolloutBatch, Sampler
from rpgrl.loop.setup import RunData, setup_run
from rpgrl.loop.host_memory import configure_host
from rpgrl.loop.run_state import Checkpoints, code_text, code_version, finish_run, headline_text
from rpgrl.loop.schedule import mini_batch_schedule, num_mini_batches, old_logp_from_update
from rpgrl.loop.train_state import TrainState
from rpgrl.loop.tracking import NoTracker, Tracker, progress_bar

__all__ = ["Batch", "Trainer", "TrainingError"]


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many consecutive non-finite steps)."""


class Trainer:
    def __init__(self, cfg: Config, *, resume: bool = False, log=print) -> None:
        started = time.perf_counter()  # wall time includes the warm start and model load
        # under torchrun: one data-parallel process per rank (rpgrl.parallel.strategy: replicas or shards)
        self.dist = init_distributed(cfg.trainer.device)
        check_world_size(cfg, self.dist.world_size)
        self.cfg, self.log = cfg, (log if self.dist.is_main else lambda *_a, **_k: None)
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.code = code_version() if self.dist.is_main else None
        if self.code is not None:
            self.log(f"code: {code_text(self.code)}")
        configure_host(cfg.trainer)  # threads; on CPU, glibc keeps freed memory
        seed_all(cfg.seed)
        self.data: RunData
        with self.dist.main_first():  # rank 0 fills the warm-start cache, the others reuse it
            self.data, self.model, self.tokenizer, self.device = setup_run(cfg, log=self.log)
        if self.dist.enabled:
            if self.device.type == "cuda":
                self.device = self.dist.device
            self.dist.broadcast_module(self.model)
            seed_all(rank_seed(cfg.seed, self.dist.rank))  # each rank samples its own responses
        a = cfg.algorithm  # the anchor snapshot is a plain replica, taken before sharding
        self.anchor = Anchor.create(a.anchor.mode, self.model, period=a.anchor.period_optimizer_steps, kappa=a.anchor.kappa,
                                    ema=a.anchor.ema)
        self.parallel = make_parallel(self.dist, cfg, self.data.precision, self.device)
        self.parallel.wrap(self.model)
        self.optimizer, self.scheduler = build_optimizer(
            self.model, cfg.optim.name, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
            warmup_steps=cfg.optim.warmup_optimizer_steps,
        )
        self.loss = BoundLoss(a.loss, beta=a.beta, clip=(a.clip_low, a.clip_high), dual_clip=a.dual_clip,
                              agg=a.agg, kl_in_advantage=a.kl_in_advantage)
        self.sampler = Sampler(self.model, self.tokenizer, device=self.device, engine=cfg.rollout.engine,
                               batch_size=cfg.rollout.generate_batch_sequences, scorer=self.data.scorer,
                               timeout_s=cfg.reward_timeout_s, compute=self.parallel.compute)
        prompt_order = PromptOrder(len(self.data.train), cfg.seed)
        self.flops = self.peak = None
        if cfg.trainer.profile:  # model FLOP utilisation per phase, against the compute dtype's peak
            self.flops, self.peaks = PhaseFlops(self.model), matmul_peaks(self.device)
            self.peak = peak_for(self.peaks, self.data.precision.compute_dtype)
            self.log(f"profile: {M.peaks_text(self.peaks, self.peak)}")
        self.timer = StepTimer()
        # what a checkpoint holds besides the weights and optimizer tensors (rpgrl.loop.train_state)
        self.state = TrainState(prompt_order, self.anchor, self.scheduler, started=started)
        self.checkpoints = Checkpoints(self.out, self.dist, self.parallel, keep_last=cfg.trainer.keep_last, log=self.log)
        resumed = resume and self.checkpoints.resume(self.state, self.model, self.optimizer, seed=cfg.seed)
        self.tracker = NoTracker()
        if self.dist.is_main:
            lc = cfg.logging
            self.tracker = Tracker(self.out, tensorboard=lc.tensorboard, wandb=lc.wandb, wandb_project=lc.wandb_project,
                                   run_name=lc.run_name, config=to_dict(cfg),
                                   resume_step=self.state.step if resumed else None)
            (self.out / "config.yaml").write_text(dump_yaml(cfg))

    def _weights(self):
        """The weights one samples and evaluates with (collective when the strategy gathers)."""
        return self.parallel.inference_weights(self.model, self.optimizer)

    # ------------------------------------------------------------------ experience

    def collect(self) -> tuple[Batch | None, dict]:
        """Generate and score (``rpgrl.loop.collect.collect``); the last update's gradients go first (memory)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.sampler.sync(self.model)
        return collect(self.cfg, self.sampler, self.data, self.state.prompt_order, self.dist, self.timer,
                       self._weights)

    @torch.no_grad()
    def _logprobs(self, model, rollout: RolloutBatch, with_entropy: bool = False):
        parts_lp, parts_ent = [], []
        t, bs = self.cfg.trainer, self.cfg.trainer.micro_batch_sequences
        fn = self.parallel.logprobs(model)
        for s in range(0, rollout.input_ids.shape[0], bs):
            lp, ent = fn(rollout.input_ids[s:s + bs].to(self.device), rollout.attention_mask[s:s + bs].to(self.device),
                         rollout.prompt_len, chunk_size=t.logprob_chunk_size, with_entropy=with_entropy,
                         temperature=self.cfg.rollout.temperature, share_prompts=t.share_prompts)
            parts_lp.append(lp.float().cpu())
            if ent is not None:
                parts_ent.append(ent.float().cpu())
        return torch.cat(parts_lp), (torch.cat(parts_ent) if parts_ent else None)

    def prepare(self, batch: Batch) -> None:
        """pi_old log-probs (a separate pass, or the update's own first forward: decided here,
        once per batch), anchor log-probs per anchor mode, advantages."""
        a = self.cfg.algorithm
        batch.old_logp_in_update = old_logp_from_update(self.cfg, batch.rollout.input_ids.shape[0])
        r = batch.rollout
        from_sampler = not batch.old_logp_in_update and r.logprobs is not None  # rpgrl.loop.collect.wants_sampler_logprobs
        with self.timer.phase("logprobs"):
            self._logprob_passes = int(not batch.old_logp_in_update and not from_sampler) + int(not self.anchor.uses_rollout)
            if from_sampler:  # pi_old's log-probs from the logits the sampler drew from: no pass
                batch.old_logp, batch.entropy = r.logprobs, r.entropy
            elif not batch.old_logp_in_update:
                batch.old_logp, batch.entropy = self._logprobs(self.model, batch.rollout, with_entropy=True)
            self.anchor.maybe_refresh(self.parallel.full_weights(self.model))
            if not self.anchor.uses_rollout:
                batch.anchor_logp, _ = self._logprobs(self.anchor.model, batch.rollout)
        mask = batch.rollout.response_mask
        token_kl = None
        if a.kl_in_reward > 0:
            ref = batch.anchor_logp if batch.anchor_logp is not None else batch.old_logp
            token_kl = kl_penalty(batch.old_logp, ref, kind="k1") * mask
        batch.advantages = global_advantages(self.dist, a.advantage, batch.rewards, batch.group_ids, mask,
                                             token_kl=token_kl, kl_coef=a.kl_in_reward)

    # ------------------------------------------------------------------ update

    def update(self, batch: Batch) -> dict[str, float]:
        """The batch's optimizer steps (docs/math.md §7): for each mini-batch of the schedule
        (epochs x shuffled mini-batches), forward/backward of its micro-batches, one optimizer
        step, then the anchor observes the step (and refreshes when due)."""
        r, n_seq = batch.rollout, batch.rollout.input_ids.shape[0]
        schedule = mini_batch_schedule(n_seq, num_mini_batches(self.cfg, n_seq), self.cfg.trainer.epochs,
                                       seed=self.cfg.seed, step=self.state.step)
        if batch.old_logp_in_update:  # prepare chose it; _micro_step fills these from its forward
            batch.old_logp, batch.entropy = torch.zeros_like(r.response_mask), torch.zeros_like(r.response_mask)
        elif batch.old_logp is None:
            raise ValueError("update: the batch has no pi_old log-probs; call prepare(batch) first")
        acc, logprobs = M.UpdateMetrics(), self.parallel.logprobs(self.model)
        self._update_prompt_tokens = 0  # what the micro-batches' forwards run (M.mfu_metrics)
        for i_mb, rows in enumerate(schedule):
            kl_to_anchor = self._mini_batch(batch, rows, logprobs, acc, share=1.0 / len(schedule))
            with self.timer.phase("optimizer"):
                grad_norm = self._apply_gradients()
                self.anchor.observe(self.dist.mean(kl_to_anchor))
            if self.anchor.due and i_mb + 1 < len(schedule):
                self._refresh_anchor_mid_batch(batch, torch.cat(schedule[i_mb + 1:]).unique())
            acc.add(M.GRAD_NORM, (grad_norm if math.isfinite(grad_norm) else 0.0) / len(schedule))
        return {**acc.values, M.SKIPPED_STEPS_TOTAL: self.state.skipped_total, M.OPTIMIZER_STEPS: len(schedule)}

    def _mini_batch(self, batch: Batch, rows: torch.Tensor, logprobs, acc: M.UpdateMetrics, share: float) -> float:
        """Accumulate the gradient of one mini-batch over its micro-batches, the loss normalised
        by the global mini-batch's count (docs/math.md §6); add their metrics (token-weighted,
        ``share`` = 1 / optimizer steps) to ``acc``; return its KL to the anchor (token mean)."""
        mask = batch.rollout.response_mask
        norm = self.dist.all_reduce_sum(float(aggregation_count(mask[rows], self.loss.agg)))
        tokens = max(float(mask[rows].sum()), 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        kl_to_anchor = 0.0
        for micro in torch.split(rows, self.cfg.trainer.micro_batch_sequences):
            with self.timer.phase("forward_backward"):
                loss, m = self._micro_step(batch, micro, logprobs, max(norm, 1.0))
            # one host sync per micro-batch; its loss metrics are token means: weight by its tokens
            loss_v, *vals = torch.stack([loss.detach(), *(m[k] for k in METRIC_KEYS)]).tolist()
            micro_tokens = float(mask[micro].sum())
            P = batch.rollout.prompt_len
            self._update_prompt_tokens += M.micro_prompt_tokens(
                batch.rollout.input_ids[micro, :P], batch.rollout.attention_mask[micro, :P], batch.group_ids[micro])
            w = micro_tokens / tokens
            acc.add(M.LOSS, loss_v, share)
            for k, v in zip(METRIC_KEYS, vals):
                acc.add(M.actor(k), v, w, share)
            for k, total in zip(M.KL_SHARE_SUMS, KL_SHARE_KEYS):  # token sums, for the exact step ratio
                acc.add(k, vals[METRIC_KEYS.index(total)] * micro_tokens)
            kl_to_anchor += vals[METRIC_KEYS.index("kl_anchor_k3")] * w
        return kl_to_anchor

    def _micro_step(self, batch: Batch, micro: torch.Tensor, logprobs, norm: float):
        """Forward, loss and backward of one micro-batch; (loss, loss metrics)."""
        t, r = self.cfg.trainer, batch.rollout
        logp, entropy = logprobs(r.input_ids[micro].to(self.device), r.attention_mask[micro].to(self.device),
                                 r.prompt_len, chunk_size=t.logprob_chunk_size, with_entropy=batch.old_logp_in_update,
                                 temperature=self.cfg.rollout.temperature, share_prompts=t.share_prompts)
        if batch.old_logp_in_update:  # the rollout weights, before this batch's only optimizer step
            batch.old_logp[micro] = logp.detach().float().cpu()
            batch.entropy[micro] = entropy.float().cpu()

        def dev(x):
            return None if x is None else x[micro].to(self.device)

        loss, m = self.loss(logp.float(), dev(batch.old_logp), dev(batch.advantages), dev(r.response_mask),
                            dev(batch.anchor_logp), norm=norm)
        loss.backward()
        return loss, m

    def _refresh_anchor_mid_batch(self, batch: Batch, rows: torch.Tensor) -> None:
        """A refresh due after an optimizer step that is not the batch's last (K counts
        optimizer steps, docs/math.md §1.1): snapshot the policy now and recompute the anchor
        log-probs of the ``rows`` the remaining mini-batches use. The advantages (and a KL
        folded into the reward) keep the anchor of the batch start."""
        with self.timer.phase("logprobs"), eval_mode(self.optimizer):
            self.anchor.maybe_refresh(self.parallel.full_weights(self.model))
            batch.anchor_logp[rows] = self._logprobs(self.anchor.model, batch.rollout.select(rows))[0]

    def _apply_gradients(self) -> float:
        """Global grad -> clip -> optimizer step, or skip a non-finite step (docs/math.md §7)."""
        t = self.cfg.trainer
        self.parallel.reduce_grads(self.model)  # clip sees the global grad
        grad_norm, finite = clip_and_step(self.optimizer, self.model.parameters(), self.cfg.optim.grad_clip)
        self.state.record_optimizer_step(finite)
        if finite:
            if self.scheduler is not None:
                self.scheduler.step()
            return grad_norm
        self.optimizer.zero_grad(set_to_none=True)
        skips = self.state.consecutive_skips
        self.log(f"step {self.state.step + 1}: non-finite gradient norm, optimizer step skipped ({skips} in a row)")
        if skips >= t.max_consecutive_skips:
            raise TrainingError(
                f"{skips} consecutive optimizer steps had a non-finite loss or gradient "
                f"(trainer.max_consecutive_skips={t.max_consecutive_skips}). Look at: the learning rate "
                "(optim.lr), the reward scale, rollout.temperature, and the dtype (model.dtype). The last "
                f"good checkpoint is in {self.out / 'checkpoints'}.")
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
            mask, r = batch.rollout.response_mask, batch.rollout
            metrics.update({
                M.REWARD: float(batch.rewards.mean()),
                M.ACCURACY: float((batch.scores > M.CORRECT_SCORE_ABOVE).float().mean()),
                M.LENGTH_MEAN: float(r.response_lengths.float().mean()),
                M.LENGTH_MAX: float(r.response_lengths.max()),
                M.LENGTH_CLIP_RATIO: float(r.truncated.float().mean()),
                M.ENTROPY: float((batch.entropy * mask).sum() / mask.sum().clamp(min=1)),
                M.ANCHOR_REFRESHES: self.anchor.refreshes,
            })
        self.state.step += 1
        metrics.update(self.timer.metrics(time.perf_counter() - start))
        if self.flops is not None and batch is not None:
            counts = M.token_counts(r.attention_mask, r.prompt_len, mask, self.cfg.rollout.n)
            generation = (int(metrics[M.GEN_PROMPT_TOKENS]), int(metrics[M.GEN_TOKENS]))
            metrics.update(M.mfu_metrics(self.flops, *counts, self.timer.seconds, epochs=self.cfg.trainer.epochs,
                                         logprob_passes=self._logprob_passes, peak_gflops=self.peak,
                                         generation=generation, update_prompt_tokens=self._update_prompt_tokens))
            metrics.update({f"{M.PEAK_GFLOPS}_{k}": v for k, v in self.peaks.items()})
            metrics[M.PEAK_RSS] = M.peak_rss_mb()
        metrics[M.LR] = float(self.optimizer.param_groups[0]["lr"])
        return M.with_kl_share(self.dist.reduce_metrics(metrics, sum_prefixes=M.SUM_METRICS, max_keys=M.MAX_METRICS))

    def evaluate(self) -> dict:
        """Held-out mean@k with the sampler on the current weights (call inside ``_weights()``)."""
        e = self.cfg.eval
        self.sampler.sync(self.model)
        return evaluate_with(self.sampler, self.data.test, self.data.test_prompts, k=e.k, temperature=e.temperature,
                             max_new_tokens=e.max_new_tokens or self.cfg.rollout.max_new_tokens,
                             max_problems=e.max_problems)

    def _evaluate_and_log(self, step: int) -> dict:
        """Rank 0, inside ``_weights()`` (which every rank enters: a sharded policy gathers)."""
        result = self.evaluate()
        flat = {M.EVAL_ACCURACY: result["accuracy"], **{f"eval/{k}": v for k, v in result.get("secondary", {}).items()},
                **{f"eval/{k}": v for k, v in flatten(result).items()}}
        self.state.best_last.update(step, flat)
        self.tracker.log(flat, step=step)
        return result

    def save(self) -> Path | None:
        """Checkpoint (rank 0 writes); the checkpoint directory on rank 0, else None."""
        return self.checkpoints.save(self.state, self.model, self.optimizer)

    def train(self) -> dict:
        cfg, t0, main, state = self.cfg, time.perf_counter(), self.dist.is_main, self.state
        if state.eval_before is None and cfg.eval.before_training:
            with self._weights():  # all ranks gather; rank 0 evaluates, the others wait
                if main:
                    state.eval_before = self._evaluate_and_log(step=0)
                    self.log(f"held-out accuracy before RL: {headline_text(state.eval_before)}")
        progress = progress_bar(cfg.trainer.total_steps, state.step, cfg.logging.progress and main,
                                every_s=cfg.logging.progress_every_s)
        try:
            while state.step < cfg.trainer.total_steps:
                metrics = self.step()
                self.tracker.log(metrics, step=state.step)
                progress.update(1)
                progress.set_postfix({k: f"{metrics.get(key, float('nan')):{f}}" for k, key, f in (
                    ("reward", M.REWARD, ".3f"), ("acc", M.ACCURACY, ".2f"), ("kl", M.KL_ANCHOR, ".1e"),
                    ("ent", M.ENTROPY, ".2f"), ("len", M.LENGTH_MEAN, ".1f"))})
                if cfg.trainer.eval_every and state.step % cfg.trainer.eval_every == 0 \
                        and state.step < cfg.trainer.total_steps:
                    with self._weights():
                        if main:
                            self._evaluate_and_log(step=state.step)
                if state.step % cfg.trainer.save_every == 0 or state.step == cfg.trainer.total_steps:
                    self.save()
        finally:
            progress.close()
        final_sd = self.parallel.final_state_dict(self.model, self.optimizer)
        with self._weights():
            summary = self._finish(t0, final_sd) if main else None
        return self.dist.broadcast_object(summary)  # also keeps the others until rank 0 is done

    def _finish(self, t0: float, final_sd: dict | None) -> dict:
        """Rank 0: the final evaluation, then final/, curves.png and summary.json."""
        eval_after = self._evaluate_and_log(self.state.step)
        self.tracker.close()  # flushes metrics.jsonl before it is plotted
        return finish_run(self.out, self.state, eval_after, model=self.model, tokenizer=self.tokenizer,
                          algorithm=self.cfg.algorithm.preset, train_started=t0, final_sd=final_sd,
                          profile_log=self.log if self.cfg.trainer.profile else None, code=self.code)
