"""A trainer's run state on disk: checkpoints (save / resume) and the final outputs
(``final/``, ``curves.png``, ``summary.json``). Collective where the strategy gathers."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rpgrl.loop.checkpoint import (capture_rng_state, find_latest_checkpoint, restore_rng_state,
                              save_checkpoint, seed_all)
from rpgrl.parallel.distributed import rank_seed
from rpgrl.loop.eval_metrics import BestLastTracker
from rpgrl.loop.metrics import profile_table

if TYPE_CHECKING:
    from rpgrl.loop.trainer import Trainer


def save_run(t: "Trainer") -> Path | None:
    """Rank 0 writes the model once, with every rank's RNG state; returns the checkpoint
    directory there and None on the other ranks."""
    rng_per_rank = t.dist.all_gather_object(capture_rng_state()) if t.dist.enabled else None
    state = {
        "step": t.step_count, "sampler": t.prompt_order.state_dict(), "rng": capture_rng_state(),
        "scheduler": t.scheduler.state_dict() if t.scheduler is not None else {},
        "anchor": t.anchor.state_dict(), "skipped_total": t.skipped_total,
        "consecutive_skips": t.consecutive_skips, "eval_before": json.dumps(t.eval_before),
        "best_last": json.dumps(t.best_last.to_dict()),
    }
    if rng_per_rank is not None:
        state["rng_per_rank"] = rng_per_rank
    model, optimizer = t.parallel.checkpoint_views(t.model, t.optimizer)
    path = None
    if t.dist.is_main:
        path = save_checkpoint(t.out, t.step_count, model, optimizer, state, keep_last=t.cfg.trainer.keep_last)
    t.dist.barrier()  # no rank runs ahead of (or exits before) a finished checkpoint
    return path


def resume_run(t: "Trainer") -> bool:
    """Load the latest complete checkpoint of ``t.out`` into ``t``; False if there is none."""
    path = t.dist.broadcast_object(find_latest_checkpoint(t.out) if t.dist.is_main else None)
    if path is None:
        t.log(f"--resume: no complete checkpoint under {t.out / 'checkpoints'}; starting fresh")
        return False
    state = t.parallel.load(path, t.model, t.optimizer)
    t.step_count = int(state["step"])
    t.prompt_order.load_state_dict(state["sampler"])
    if t.scheduler is not None and state["scheduler"]:
        t.scheduler.load_state_dict(state["scheduler"])
    t.anchor.load_state_dict(state["anchor"])
    t.skipped_total, t.consecutive_skips = int(state["skipped_total"]), int(state["consecutive_skips"])
    t.eval_before = json.loads(state["eval_before"])
    t.best_last = BestLastTracker.from_dict(json.loads(state["best_last"]))
    per_rank = state.get("rng_per_rank")
    if not t.dist.enabled:
        restore_rng_state(state["rng"])
    elif per_rank is not None and len(per_rank) == t.dist.world_size:
        restore_rng_state(per_rank[t.dist.rank])
    else:
        t.log(f"--resume: the checkpoint holds RNG states for {len(per_rank or [1])} process(es), "
              f"this run has {t.dist.world_size}; sampling continues from fresh per-rank seeds")
        seed_all(rank_seed(t.cfg.seed + t.step_count, t.dist.rank))
    t.log(f"resumed from {path} at step {t.step_count}")
    return True


def headline(result: dict) -> dict[str, float]:
    """summary.json's view of an evaluation: accuracy and the scorer's secondary accuracies
    (e.g. the chat arithmetic task's ``strict_acc``)."""
    return {"accuracy": result["accuracy"], **result.get("secondary", {})}


def headline_text(result: dict) -> str:
    return ", ".join(f"{v:.3f}" if k == "accuracy" else f"{k} {v:.3f}" for k, v in headline(result).items())


def finish_run(t: "Trainer", t0: float, eval_after: dict, final_sd: dict | None = None) -> dict:
    """final/ model, curves.png and summary.json (rank 0 only); ``final_sd``: the
    gathered full weights of a sharded policy."""
    cfg = t.cfg
    t.tracker.close()
    from rpgrl.models.loading import save_final
    from rpgrl.tools.plots import plot_curves

    if final_sd is not None:  # the module holds shards: write the gathered weights
        t.model.save_pretrained(str(t.out / "final"), state_dict=final_sd, safe_serialization=True)
        t.tokenizer.save_pretrained(str(t.out / "final"))
    else:
        save_final(t.model, t.tokenizer, t.out / "final")
    plot_curves(t.out / "metrics.jsonl", t.out / "curves.png")
    if cfg.trainer.profile:
        t.log(profile_table(t.out / "metrics.jsonl"))
    summary = {
        "eval_before": headline(t.eval_before or {"accuracy": float("nan")}),
        "eval_after": headline(eval_after),
        "wall_seconds": time.perf_counter() - t._t_start,
        "train_seconds": time.perf_counter() - t0,
        "steps": t.step_count,
        "algorithm": cfg.algorithm.name,
        "eval_best_last": t.best_last.to_dict(),
        "skipped_steps": t.skipped_total,
    }
    (t.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
