"""A run's state on disk: checkpoints (a ``TrainState`` saved and resumed together with the
weights and the optimizer) and the final outputs (``final/``, ``curves.png``,
``summary.json``). Collective where the strategy gathers."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from rpgrl.loop.checkpoint import (TRAINER_STATE_FILE, capture_rng_state, find_latest_checkpoint, save_checkpoint,
                              seed_all)
from rpgrl.parallel.distributed import DistContext, rank_seed
from rpgrl.loop.metrics import profile_table
from rpgrl.parallel.strategy import SingleProcess
from rpgrl.loop.train_state import TrainState


class Checkpoints:
    """``<out>/checkpoints`` for one process of a run: every rank calls ``save`` and
    ``resume`` (the strategy may gather); rank 0 writes."""

    def __init__(self, out: Path, dist: DistContext, parallel: SingleProcess, *, keep_last: int,
                 log: Callable[[str], None] = print) -> None:
        self.out, self.dist, self.parallel, self.keep_last, self.log = out, dist, parallel, keep_last, log

    def save(self, state: TrainState, model: torch.nn.Module, optimizer) -> Path | None:
        """Rank 0 writes the model once, with every rank's RNG state; returns the checkpoint
        directory there and None on the other ranks."""
        rng_per_rank = self.dist.all_gather_object(capture_rng_state()) if self.dist.enabled else None
        model_view, optimizer_view = self.parallel.checkpoint_views(model, optimizer)
        path = None
        if self.dist.is_main:
            path = save_checkpoint(self.out, state.step, model_view, optimizer_view, state.state_dict(rng_per_rank),
                                   keep_last=self.keep_last)
        self.dist.barrier()  # no rank runs ahead of (or exits before) a finished checkpoint
        return path

    def resume(self, state: TrainState, model: torch.nn.Module, optimizer, *, seed: int) -> bool:
        """Load the latest complete checkpoint into ``state``, ``model`` and ``optimizer``;
        False if there is none. A checkpoint without this rank's RNG state (another number
        of processes) continues from fresh per-rank seeds derived from ``seed`` and the step."""
        path = self.dist.broadcast_object(find_latest_checkpoint(self.out) if self.dist.is_main else None)
        if path is None:
            self.log(f"--resume: no complete checkpoint under {self.out / 'checkpoints'}; starting fresh")
            return False
        saved = self.parallel.load(path, model, optimizer)
        if not state.load_state_dict(saved, rank=self.dist.rank, world_size=self.dist.world_size,
                                     source=str(path / TRAINER_STATE_FILE)):
            self.log(f"--resume: the checkpoint holds RNG states for {len(saved.get('rng_per_rank') or [1])} "
                     f"process(es), this run has {self.dist.world_size}; sampling continues from fresh per-rank seeds")
            seed_all(rank_seed(seed + state.step, self.dist.rank))
        self.log(f"resumed from {path} at step {state.step}")
        return True


def headline(result: dict) -> dict[str, float]:
    """summary.json's view of an evaluation: accuracy and the scorer's secondary accuracies
    (e.g. the chat arithmetic task's ``strict_acc``)."""
    return {"accuracy": result["accuracy"], **result.get("secondary", {})}


def headline_text(result: dict) -> str:
    return ", ".join(f"{v:.3f}" if k == "accuracy" else f"{k} {v:.3f}" for k, v in headline(result).items())


#: Environment variables that change which vector kernels torch, MKL and oneDNN run, hence the
#: rounding of every step: a run records the ones that were set.
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")


def machine_record(device: torch.device | str) -> dict:
    """What decides a run's arithmetic, so whether a rerun can be bit-for-bit: the torch and
    transformers builds, the CPU and the vector-kernel level ATen dispatches to, the thread count.
    Sampling turns any difference into other samples sooner or later (docs/benchmarks.md, section 4)."""
    import transformers

    from rpgrl.models.loading import cpuinfo_values

    device = torch.device(device)
    cpu = (cpuinfo_values("model name") or [platform.processor() or platform.machine()])[0]
    rec: dict = {"torch": torch.__version__, "transformers": transformers.__version__,
                 "python": platform.python_version(), "device": device.type, "threads": torch.get_num_threads(),
                 "cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if device.type == "cuda":
        rec["gpu"] = torch.cuda.get_device_name(device)
    env = {k: os.environ[k] for k in KERNEL_ENV if k in os.environ}
    if env:
        rec["kernel_env"] = env
    return rec


def code_version() -> dict:
    """The code a run ran: rpgrl's version and, when rpgrl is imported from its own git checkout,
    the commit and whether tracked files differed from it (``dirty``). Taken when the run starts:
    the runs of one study must come from one commit (docs/benchmarks.md, section 4)."""
    import subprocess

    from rpgrl import __version__

    root = Path(__file__).resolve().parents[2]
    rec: dict = {"rpgrl": __version__, "commit": None, "dirty": None}

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is not None and Path(top).resolve() == root and (root / "rpgrl" / "__init__.py").is_file():
        rec["commit"] = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
        rec["dirty"] = None if status is None else bool(status)
    return rec


def code_text(code: dict) -> str:
    """``rpgrl 0.1.0, commit 1a2b3c4d5e6f (clean)`` for the start-of-run log line."""
    if not code.get("commit"):
        return f"rpgrl {code['rpgrl']} (not a git checkout: no commit recorded)"
    state = {True: "with uncommitted changes", False: "clean"}.get(code.get("dirty"), "status unknown")
    return f"rpgrl {code['rpgrl']}, commit {code['commit'][:12]} ({state})"


def finish_run(out: Path, state: TrainState, eval_after: dict, *, model: torch.nn.Module, tokenizer,
               algorithm: str, train_started: float, final_sd: dict | None = None,
               profile_log: Callable[[str], None] | None = None, code: dict | None = None) -> dict:
    """final/ model, curves.png and summary.json (rank 0 only, after the tracker has flushed
    metrics.jsonl); ``final_sd``: the gathered full weights of a sharded policy;
    ``profile_log``: where the step-time table goes (trainer.profile); ``code``: the run's
    :func:`code_version`, taken at its start."""
    from rpgrl.models.loading import save_final
    from rpgrl.tools.plots import plot_curves

    if final_sd is not None:  # the module holds shards: write the gathered weights
        model.save_pretrained(str(out / "final"), state_dict=final_sd, safe_serialization=True)
        tokenizer.save_pretrained(str(out / "final"))
    else:
        save_final(model, tokenizer, out / "final")
    plot_curves(out / "metrics.jsonl", out / "curves.png")
    if profile_log is not None:
        profile_log(profile_table(out / "metrics.jsonl"))
    summary = {
        "eval_before": headline(state.eval_before or {"accuracy": float("nan")}),
        "eval_after": headline(eval_after),
        "wall_seconds": time.perf_counter() - state.started,
        "train_seconds": time.perf_counter() - train_started,
        "steps": state.step,
        "algorithm": algorithm,
        "eval_best_last": state.best_last.to_dict(),
        "skipped_steps": state.skipped_total,
        "machine": machine_record(next(model.parameters()).device),
        "code": code if code is not None else code_version(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
