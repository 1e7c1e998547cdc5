"""Batch scoring that never crashes or hangs training.

A scorer that raises, runs past its timeout, or returns something that is not a number
gives reward 0, is counted in the returned stats, and is logged with its data_source.

User scorers run in a persistent worker process (one per scorer) that is killed and
restarted when a call runs past ``timeout_s`` — the only way to stop arbitrary Python
code (a thread cannot be killed). The built-in scorers are linear-time string work plus
math-verify, which only sees small predictions (``verify.symbolic_cost``) and bounds
itself with ``signal.alarm``; they run in-process when called from the main thread and
go through a worker otherwise (signals are unavailable there).
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing as mp
import numbers
import signal
import sys
import threading
import time
import traceback
from typing import Any
from collections.abc import Callable

from rpgrl.rewards.router import compute_score
from rpgrl.rewards.verify import in_main_thread

__all__ = ["score_batch", "to_reward", "close_workers"]

log = logging.getLogger(__name__)

_MAX_WARNINGS_PER_BATCH = 5
_START_TIMEOUT_S = 60.0
_START_METHOD = "fork" if sys.platform == "linux" and "fork" in mp.get_all_start_methods() else "spawn"


class _StartError(RuntimeError):
    """A scorer worker process failed to start; already cleaned up."""


def to_reward(value: Any) -> float | None:
    """A scorer's return value as a finite float, or None if it is not a valid reward.

    Valid: a real number (bool, int, float, numpy scalar) or a dict whose ``"score"`` is one.
    """
    if isinstance(value, dict):
        value = value.get("score")
    if isinstance(value, numbers.Real):
        f = float(value)
        return f if math.isfinite(f) else None
    return None


def _worker_main(scorer: Callable, conn, inherited=None) -> None:
    """Loop of the worker process: receive kwargs, call the scorer, send the result.

    ``inherited``: the parent's end of the pipe, which a forked child holds a copy of; it is
    closed first, so that ``recv`` sees EOF (and the worker exits) when the parent dies,
    even by SIGKILL, instead of living on as an orphan.
    """
    if inherited is not None:
        inherited.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn.send(("ready", None))
    while True:
        try:
            kwargs = conn.recv()
        except (EOFError, OSError):
            return
        if kwargs is None:
            return
        try:
            value = scorer(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - report everything, keep serving
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            conn.send(("error", last))
            continue
        try:
            conn.send(("ok", value))
        except Exception:  # unpicklable return value
            conn.send(("ok", f"<unpicklable {type(value).__name__}>"))


class _Worker:
    """One persistent scorer process; restarted lazily after a kill or a crash."""

    def __init__(self, scorer: Callable) -> None:
        self.scorer = scorer  # strong reference: keeps id(scorer) valid as the cache key
        self.proc = None
        self.conn = None
        self.lock = threading.Lock()

    def _start(self) -> None:
        """Start the process and wait for its "ready"; on any failure leave nothing behind.

        A child that dies before reporting ready (e.g. a scorer module that exits on
        import under spawn) or never reports must not leak its process or pipe: ``call``
        cannot clean up what was never assigned to ``self``.
        """
        ctx = mp.get_context(_START_METHOD)
        parent, child = ctx.Pipe()
        inherited = parent if _START_METHOD == "fork" else None  # spawn children get only what is passed
        proc = ctx.Process(target=_worker_main, args=(self.scorer, child, inherited), daemon=True,
                           name="rpgrl-scorer")
        try:
            try:
                proc.start()
            finally:
                child.close()
            # spawn start-up imports; not part of any call's budget
            if not parent.poll(_START_TIMEOUT_S):
                raise _StartError(f"did not report ready within {_START_TIMEOUT_S:g} s")
            try:
                msg = parent.recv()
            except (EOFError, OSError):
                proc.join(1.0)
                raise _StartError(f"died during start-up (exit code {proc.exitcode})") from None
            if msg != ("ready", None):
                raise _StartError(f"sent {msg!r:.200} instead of ready")
        except BaseException as exc:
            parent.close()
            if proc.pid is not None:
                proc.kill()
                proc.join(5.0)
            if isinstance(exc, _StartError):
                raise _StartError(f"scorer worker process {exc}") from None
            raise
        self.proc, self.conn = proc, parent

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(5.0)
            self.conn.close()
        self.proc = self.conn = None

    def call(self, kwargs: dict, timeout_s: float) -> tuple[str, Any]:
        """("ok", value) | ("error", message) | ("timeout", None)."""
        with self.lock:
            try:
                if self.proc is None or not self.proc.is_alive():
                    self.kill()
                    self._start()
                self.conn.send(kwargs)
                if not self.conn.poll(timeout_s):
                    self.kill()
                    return "timeout", None
                return self.conn.recv()
            except _StartError as exc:
                return "error", str(exc)
            except (EOFError, OSError, BrokenPipeError) as exc:
                self.kill()
                return "error", f"scorer worker process died ({exc!r})"
            except Exception as exc:  # e.g. unpicklable arguments or scorer (spawn)
                self.kill()
                return "error", f"cannot run scorer in a worker process: {exc!r}"

    def close(self) -> None:
        with self.lock:
            if self.proc is not None and self.proc.is_alive():
                try:
                    self.conn.send(None)
                    self.proc.join(1.0)
                except Exception:
                    pass
            self.kill()


_WORKERS: dict[int, _Worker] = {}
_WORKERS_LOCK = threading.Lock()


def _worker_for(scorer: Callable) -> _Worker:
    with _WORKERS_LOCK:
        w = _WORKERS.get(id(scorer))
        if w is None or w.scorer is not scorer:
            w = _WORKERS[id(scorer)] = _Worker(scorer)
        return w


def close_workers() -> None:
    """Stop every scorer worker process (also run at interpreter exit)."""
    with _WORKERS_LOCK:
        workers = list(_WORKERS.values())
        _WORKERS.clear()
    for w in workers:
        w.close()


atexit.register(close_workers)


def score_batch(
    data_sources: list[str],
    responses: list[str],
    ground_truths: list[str],
    extra_infos: list[dict | None] | None = None,
    scorer: Callable | None = None,
    timeout_s: float = 10.0,
    details: list | None = None,
) -> tuple[list[float], dict]:
    """Rewards for a batch of responses, and failure counts for the training log.

    ``scorer`` is called as ``scorer(data_source=, solution_str=, ground_truth=,
    extra_info=)`` (verl's keywords); ``None`` means the built-in ``compute_score``.
    Each call is bounded by ``timeout_s``. Empty responses score 0 without a call.
    Returns ``(rewards, stats)`` with stats keys ``n``, ``scorer_errors``,
    ``scorer_timeouts``, ``scorer_bad_return``, ``empty_responses``, ``score_time_s``.
    ``details``, if given, receives each response's raw dict return (``None`` for a float
    return or a failure), e.g. the secondary accuracies an evaluation reports.
    """
    n = len(responses)
    if extra_infos is None:
        extra_infos = [None] * n
    if not (len(data_sources) == len(ground_truths) == len(extra_infos) == n):
        raise ValueError(
            f"score_batch: lengths differ: data_sources={len(data_sources)}, responses={n}, "
            f"ground_truths={len(ground_truths)}, extra_infos={len(extra_infos)}"
        )
    if timeout_s <= 0:
        raise ValueError(f"score_batch: timeout_s must be > 0, got {timeout_s}")
    fn = compute_score if scorer is None else scorer
    in_process = (scorer is None or getattr(scorer, "builtin", False) is True) and in_main_thread()
    worker = None if in_process else _worker_for(fn)
    stats = {"n": n, "scorer_errors": 0, "scorer_timeouts": 0, "scorer_bad_return": 0,
             "empty_responses": 0}
    rewards = [0.0] * n
    raw: list = [None] * n
    warned = 0
    t0 = time.perf_counter()

    def warn(kind: str, i: int, detail: str) -> None:
        nonlocal warned
        warned += 1
        if warned <= _MAX_WARNINGS_PER_BATCH:
            log.warning("scorer %s on item %d (data_source=%r): %s; reward set to 0",
                        kind, i, data_sources[i], detail)

    for i in range(n):
        if not responses[i]:
            stats["empty_responses"] += 1
            continue
        kwargs = {"data_source": data_sources[i], "solution_str": responses[i],
                  "ground_truth": ground_truths[i], "extra_info": extra_infos[i]}
        if in_process:
            try:
                status, value = "ok", fn(**kwargs)
            except Exception as exc:
                status, value = "error", repr(exc)
        else:
            status, value = worker.call(kwargs, timeout_s)
        if status == "timeout":
            stats["scorer_timeouts"] += 1
            warn("timeout", i, f"no result after {timeout_s:g} s (worker restarted)")
            continue
        if status == "error":
            stats["scorer_errors"] += 1
            warn("error", i, str(value))
            continue
        reward = to_reward(value)
        if reward is None:
            stats["scorer_bad_return"] += 1
            warn("bad return", i, f"expected a finite number or a dict with a numeric 'score', "
                                  f"got {value!r:.200}")
            continue
        rewards[i] = reward
        raw[i] = value if isinstance(value, dict) else None
    if details is not None:
        details.extend(raw)
    if warned > _MAX_WARNINGS_PER_BATCH:
        log.warning("scorer: %d failures in this batch (%d shown)", warned, _MAX_WARNINGS_PER_BATCH)
    stats["score_time_s"] = time.perf_counter() - t0
    return rewards, stats
