"""The names of the logged metrics (one place for the trainer, ``rpgrl.tools.plots`` and
``rpgrl.tools.compare``), how they combine over ranks, and the step-time breakdown.

Loss metrics are prefixed ``actor/`` + the loss's own ``METRIC_KEYS`` (docs/math.md §7: clip
fractions, KL to the anchor, importance weights).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path

from rpgrl.losses.policy import MAX_METRIC_KEYS, kl_share

STEP = "step"
# per RL step (rpgrl.loop.trainer)
LOSS = "actor/loss"
GRAD_NORM = "actor/grad_norm"
ENTROPY = "actor/entropy"
OPTIMIZER_STEPS = "actor/optimizer_steps"
SKIPPED_STEPS_TOTAL = "actor/skipped_steps_total"
KL_ANCHOR = "actor/kl_anchor_k3"
CLIPFRACS = ("actor/clipfrac_upper", "actor/clipfrac_lower", "actor/clipfrac_dual")
REWARD = "reward/mean"
SCORE_MEAN = "reward/score_mean"
ACCURACY = "reward/accuracy"
LENGTH_MEAN = "response_length/mean"
LENGTH_MAX = "response_length/max"
LENGTH_CLIP_RATIO = "response_length/clip_ratio"
GEN_BATCHES = "batch/gen_batches"
#: a 48-bit fingerprint of the step's first generation round (RolloutBatch.digest): runs with the
#: same seed draw the same first batch, so their step-1 values must agree (rpgrl compare checks)
FIRST_ROUND_DIGEST = "batch/first_round_digest"
KEPT_GROUPS = "batch/kept_groups"
ANCHOR_REFRESHES = "anchor/refreshes"
#: sum|C_KL| / sum|w A| over the step's tokens: the KL term's share of the update
#: (rpgrl.losses.policy.KL_SHARE_KEYS); computed from the two token sums, which are summed over
#: micro-batches, optimizer steps and ranks and then dropped (:func:`with_kl_share`)
KL_SHARE = "actor/kl_share"
KL_SHARE_SUMS = ("actor/coef_kl_abs_sum", "actor/coef_pg_abs_sum")
LR = "optim/lr"
TIMING_STEP = "timing/step"
# per evaluation
EVAL_ACCURACY = "eval/accuracy"
#: a task's secondary held-out score, logged as eval/<name> (the chat arithmetic task's
#: strict "Answer: N" form)
EVAL_STRICT_ACCURACY = "eval/strict_acc"

#: ``reward/accuracy`` counts a response as correct when its raw score is above this: the
#: scorers give 1 for a correct response and 0 (DAPO's convention: -1) otherwise, so 0.5
#: splits both (``rpgrl.loop.evaluation`` uses the same cut when a scorer reports no ``acc``).
CORRECT_SCORE_ABOVE = 0.5


def actor(key: str) -> str:
    """The logged name of a loss metric (``rpgrl.losses.METRIC_KEYS``)."""
    return f"actor/{key}"


#: How a metric combines, the one rule used over a rank's micro- and mini-batches
#: (:class:`UpdateMetrics`) and over ranks under torchrun (``DistContext.reduce_metrics``):
#: ``SUM_METRICS`` (prefixes) are summed over ranks (counts, and the loss: each rank's part
#: shares the global denominator); ``MAX_METRICS`` are maxima everywhere (a mean of maxima
#: would hide the one rank whose importance weights blew up); every other metric is a mean.
SUM_METRICS = (LOSS, KEPT_GROUPS, "reward/n", "reward/scorer_", "reward/empty_", *KL_SHARE_SUMS)
MAX_METRICS = (LENGTH_MAX, *(actor(k) for k in MAX_METRIC_KEYS))


def with_kl_share(metrics: dict[str, float]) -> dict[str, float]:
    """Replace the two global token sums of ``KL_SHARE_SUMS`` by their ratio ``KL_SHARE`` (left
    out when the reward part is 0 or the KL part unknown)."""
    num, den = (metrics.pop(k, None) for k in KL_SHARE_SUMS)
    if num is not None and den is not None:
        share = kl_share(num, den)
        if math.isfinite(share):
            metrics[KL_SHARE] = share
    return metrics


class UpdateMetrics:
    """One rank's metrics of an update, accumulated over its micro-batches and optimizer steps:
    ``add(key, value, *weights)`` sums ``value * weights...`` (weights: the micro-batch's token
    share, 1 / optimizer steps; so the sums are means), except that a ``MAX_METRICS`` key
    keeps the largest unweighted value."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def add(self, key: str, value: float, *weights: float) -> None:
        if key in MAX_METRICS:
            self.values[key] = max(self.values.get(key, -math.inf), value)
            return
        for w in weights:
            value = value * w
        self.values[key] = self.values.get(key, 0.0) + value


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

    def metrics(self, total: float) -> dict[str, float]:
        out = {f"timing/{k}": v for k, v in self.seconds.items()}
        out[TIMING_STEP] = total
        out["timing/other"] = total - sum(self.seconds.values())
        return out


#: useful model FLOPs / (phase seconds x measured matmul peak), per phase (trainer.profile)
MFU_PHASES = ("generation", "generation_sampled", "logprobs", "forward_backward", "forward_backward_scheduled")
PEAK_GFLOPS = "mfu/matmul_peak_gflops"
PEAK_RSS = "memory/peak_rss_mb"


GEN_PROMPT_TOKENS = "tokens/generation_prompt"  # distinct prompt tokens prefilled, every sampling round
GEN_TOKENS = "tokens/generated"  # response tokens sampled, every round (groups dynamic sampling dropped too)
UPDATE_PROMPT_TOKENS = "tokens/update_prompt"  # prompt tokens the update's micro-batches run (see mfu_metrics)


def token_counts(input_ids_mask, prompt_len: int, response_mask, n: int) -> tuple[int, int]:
    """(prompt tokens of the distinct prompts, response tokens) of a rollout whose groups of
    ``n`` share a prompt: the real tokens useful work is counted on (no padding)."""
    return int(input_ids_mask[::n, :prompt_len].sum()), int(response_mask.sum())


def micro_prompt_tokens(prompt_ids, prompt_mask, group_ids) -> int:
    """Real prompt tokens a micro-batch's forward must run (``prompt_ids`` / ``prompt_mask``
    [b, P], ``group_ids`` [b]): each distinct prompt once, and the token prefix all of them
    share (a chat template's system prompt) once, as the packed path runs them
    (rpgrl.models.packing)."""
    from rpgrl.models.packing import common_prefix

    first = {}
    for i, g in enumerate(group_ids.tolist()):
        first.setdefault(g, i)
    prompts = [prompt_ids[i][prompt_mask[i].bool()].tolist() for i in first.values()]
    c = common_prefix(prompts) if prompts else 0
    return sum(len(p) for p in prompts) - c * max(len(prompts) - 1, 0)


def mfu_metrics(flops, prompt_tokens: int, response_tokens: int, seconds: dict[str, float], *,
                logprob_passes: int, epochs: int, peak_gflops: float,
                generation: tuple[int, int] | None = None, update_prompt_tokens: int | None = None) -> dict[str, float]:
    """``mfu/<phase>`` = useful FLOPs (``rpgrl.models.flops.PhaseFlops``) / seconds / peak, for each
    phase that ran; also the token counts and the peak they were divided by.

    Two phases get a second figure on the work they actually do (each only when its count is
    given). ``generation``: (distinct prompt tokens, sampled tokens) over every sampling round of
    the step -- ``mfu/generation_sampled`` counts the groups dynamic sampling then dropped, which
    ``mfu/generation`` (the kept batch's tokens) does not. ``update_prompt_tokens``: the prompt tokens the update's micro-batches ran
    (each distinct prompt once per micro-batch it appears in, their common prefix once, over all
    epochs: ``micro_prompt_tokens``). Shuffled
    mini-batches mix prompts, so a prompt runs in several micro-batches, each with other weights:
    work the exact update must do that ``mfu/forward_backward`` (each prompt once per epoch) does
    not count. ``mfu/forward_backward_scheduled`` counts it: how close the update runs to the
    peak on the work its schedule asks for."""
    useful = {"generation": flops.generation(prompt_tokens, response_tokens),
              "logprobs": logprob_passes * flops.forward(prompt_tokens, response_tokens),
              "forward_backward": epochs * flops.train(prompt_tokens, response_tokens)}
    out = {"tokens/prompt_unique": prompt_tokens, "tokens/response": response_tokens, PEAK_GFLOPS: peak_gflops}
    if generation is not None:
        useful["generation_sampled"] = flops.generation(*generation)
        out[GEN_PROMPT_TOKENS], out[GEN_TOKENS] = generation
    if update_prompt_tokens is not None:
        useful["forward_backward_scheduled"] = flops.train(update_prompt_tokens, epochs * response_tokens)
        out[UPDATE_PROMPT_TOKENS] = update_prompt_tokens
    for phase, work in useful.items():
        sec = seconds.get(phase.removesuffix("_scheduled").removesuffix("_sampled"), 0.0)
        if sec > 0 and work > 0:
            out[f"mfu/{phase}"] = work / sec / (peak_gflops * 1e9)
    return out


def peaks_text(peaks: dict[str, float], used: float) -> str:
    """``matmul peaks: float32 X, bfloat16 Y GFLOP/s; MFU against the <dtype> peak``."""
    which = next((k for k, v in peaks.items() if v == used), "?")
    return ("matmul peaks: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
            + f" GFLOP/s; MFU against the {which} peak (the dtype the matmuls run in)")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def profile_table(metrics_path: Path) -> str:
    """trainer.profile: mean seconds per phase over steps 2..N (step 1 carries warm-up costs)."""
    import numpy as np

    from rpgrl.loop.tracking import read_metrics

    rows = [r for r in read_metrics(metrics_path) if TIMING_STEP in r and r[STEP] > 1]
    if not rows:
        return "profile: fewer than 2 steps, nothing to report"
    keys = sorted({k for r in rows for k in r if k.startswith("timing/")})
    means = {k: float(np.mean([r.get(k, 0.0) for r in rows])) for k in keys}
    step = means.pop(TIMING_STEP)
    lines = [f"step-time breakdown (mean over steps 2..{rows[-1][STEP]}):"]
    lines += [f"  {k[7:]:<18}{v:8.4f} s {100 * v / step:5.1f} %" for k, v in sorted(means.items(), key=lambda kv: -kv[1])]
    lines.append(f"  {'step':<18}{step:8.4f} s")
    mfu = {p: float(np.mean([r[f"mfu/{p}"] for r in rows if f"mfu/{p}" in r]))
           for p in MFU_PHASES if any(f"mfu/{p}" in r for r in rows)}
    if mfu:
        peak = float(np.mean([r[PEAK_GFLOPS] for r in rows if PEAK_GFLOPS in r]))
        peaks = {k[len(PEAK_GFLOPS) + 1:]: rows[-1][k] for k in rows[-1] if k.startswith(PEAK_GFLOPS + "_")}
        if peaks:
            lines.append(peaks_text(peaks, rows[-1][PEAK_GFLOPS]))
        lines.append(f"model FLOP utilisation (useful FLOPs on real tokens / matmul peak {peak:.0f} GFLOP/s):")
        width = max(18, *(len(p) + 1 for p in mfu))
        lines += [f"  {p:<{width}}{100 * v:7.1f} %  ({v * peak:.0f} GFLOP/s)" for p, v in mfu.items()]
    if any(PEAK_RSS in r for r in rows):
        lines.append(f"peak RSS: {max(r.get(PEAK_RSS, 0.0) for r in rows):.0f} MiB")
    return "\n".join(lines)
