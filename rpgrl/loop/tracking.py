"""Metric sinks: an always-on JSONL file, plus TensorBoard and (optionally) Weights & Biases.

``metrics.jsonl`` is the source of truth for plots (``rpgrl.tools.plots``) and is flushed after
every line so a killed run keeps everything it logged. On resume from step N the file
is cut back to steps <= N (and TensorBoard purges later events) so curves have neither
gaps nor duplicates. Non-finite values are written as JSON ``null`` (valid JSON for any
reader) and read back as ``nan``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from numbers import Number
from pathlib import Path
from typing import Any, Callable

__all__ = ["METRICS_FILE", "Tracker", "is_finite_number", "metrics_as_floats", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
_WANDB_ID_FILE = "wandb_run_id.txt"


def _to_jsonable(key: str, v: Any) -> Any:
    """``v`` as a JSON value; TypeError naming ``key`` if it is not a scalar number/string."""
    if hasattr(v, "item") and callable(v.item):  # torch / numpy scalars
        try:
            v = v.item()
        except (ValueError, RuntimeError) as e:  # multi-element tensor / array
            raise TypeError(f"metric {key!r}: value is not a scalar ({e})") from None
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, Number):
        v = float(v) if not isinstance(v, int) else v
        return v if (isinstance(v, int) or math.isfinite(v)) else None
    raise TypeError(
        f"metric {key!r}: value {v!r:.80} of type {type(v).__name__} is not a number or string"
    )


def is_finite_number(v: object) -> bool:
    """True for a finite int/float that is not a bool: a usable point of a metric curve.

    Shared by ``rpgrl.tools.plots`` and ``rpgrl.tools.compare``, which read records where missing or
    non-finite values (JSON ``null`` -> ``nan``) must be skipped.
    """
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_lines(path: Path) -> tuple[list[dict], list[str]]:
    """Parsed records and their raw lines; a truncated/garbled final line is dropped."""
    records, raw = [], []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:  # a killed run may leave half a line
                warnings.warn(f"{path}: ignoring truncated last line {i + 1}", RuntimeWarning, stacklevel=3)
                continue
            raise ValueError(f"{path}: line {i + 1} is not valid JSON: {line[:80]!r}") from None
        if not isinstance(rec, dict) or "step" not in rec:
            raise ValueError(f"{path}: line {i + 1} has no 'step' key: {line[:80]!r}")
        records.append({k: (math.nan if v is None else v) for k, v in rec.items()})
        raw.append(line)
    return records, raw


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a ``metrics.jsonl`` (or of a run directory containing one).

    Tolerates a truncated last line (killed run); ``null`` values come back as ``nan``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} does not exist")
    return _parse_lines(path)[0]


class Tracker:
    """Log ``{name: float}`` dicts per step to JSONL, TensorBoard and W&B.

    ``resume_step=N``: continue a run resumed from checkpoint step N; metrics logged
    after N by the killed run are dropped (they will be logged again).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str | None = None,
        run_name: str | None = None,
        config: dict | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / METRICS_FILE
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        elif resume_step is None and self.path.exists() and self.path.stat().st_size > 0:
            warnings.warn(f"{self.path} exists and this is not a resume; appending to it", RuntimeWarning)
        self._file = self._tb = self._wandb = None
        try:  # a failing sink (e.g. wandb.init) must not leave the others open
            self._tb = self._open_tensorboard(resume_step) if tensorboard else None
            self._wandb = self._open_wandb(wandb_project, run_name, config, resume_step) if wandb else None
            self._file = open(self.path, "a", encoding="utf-8")
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ sinks
    def _truncate_after(self, step: int) -> None:
        records, raw = _parse_lines(self.path)
        keep = [line for rec, line in zip(records, raw) if rec["step"] <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in keep))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _open_tensorboard(self, resume_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            warnings.warn(f"TensorBoard logging disabled: {e} (pip install tensorboard)", RuntimeWarning)
            return None
        purge = None if resume_step is None else resume_step + 1
        return SummaryWriter(log_dir=str(self.output_dir / "tensorboard"), purge_step=purge)

    def _open_wandb(self, project, run_name, config, resume_step):
        try:
            import wandb
        except ImportError:
            warnings.warn(
                "wandb=True but the 'wandb' package is not installed (pip install wandb); "
                "W&B logging disabled, metrics still go to metrics.jsonl and TensorBoard",
                RuntimeWarning,
            )
            return None
        id_file = self.output_dir / _WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else None
        run = wandb.init(
            project=project, name=run_name, config=config, dir=str(self.output_dir),
            id=run_id, resume="allow" if run_id else None,
        )
        if run_id is None and getattr(run, "id", None):
            id_file.write_text(str(run.id))
        return run

    # ------------------------------------------------------------------ API
    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Append one record ``{"step": step, **metrics}`` to every sink."""
        if "step" in metrics:
            raise ValueError("metrics must not contain a 'step' key; pass it as the step argument")
        clean = {k: _to_jsonable(k, v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": int(step), **clean}, allow_nan=False) + "\n")
        self._file.flush()
        numeric = metrics_as_floats(metrics)
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, global_step=int(step))
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=int(step))

    def close(self) -> None:
        """Flush and close every sink (idempotent)."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def metrics_as_floats(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of ``metrics`` as floats (strings / None dropped)."""
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "item") and callable(v.item):
            v = v.item()
        if isinstance(v, Number) and not isinstance(v, bool):
            out[k] = float(v)
    return out


class NoTracker:
    """Ranks other than 0 log nothing (metrics are reduced to rank 0 first)."""

    def log(self, metrics, step): ...
    def close(self): ...


class _NoProgress:
    def update(self, n): ...
    def set_postfix(self, d): ...
    def close(self): ...


class LineProgress:
    """The progress bar where nobody watches a terminal (CI, cluster logs, ``| tee``): a plain,
    complete line at most every ``every_s`` seconds, and always after the last step, instead of
    tqdm's carriage-return stream (which such logs keep as one line per refresh, or one huge line).
    """

    def __init__(self, total: int, initial: int, every_s: float, *, desc: str = "rpgrl train",
                 stream=None, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.n, self.first, self.every_s, self.desc = total, initial, initial, every_s, desc
        self.stream, self.clock = stream, clock
        self.start = self.last_write = clock()
        self.written, self.postfix = initial, {}

    def update(self, n: int) -> None:
        self.n += n

    def set_postfix(self, d: dict) -> None:
        self.postfix = dict(d)
        # the first step (is it alive, how fast?), then every every_s seconds, and the last
        if self.written == self.first or self.n >= self.total or self.clock() - self.last_write >= self.every_s:
            self._write()

    def close(self) -> None:
        if self.n != self.written:
            self._write()

    def line(self) -> str:
        from tqdm import tqdm

        elapsed = self.clock() - self.start
        done = self.n - self.first
        text = f"{self.desc}: step {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%)"
        text += f", {tqdm.format_interval(elapsed)} elapsed"
        if done > 0:
            per = elapsed / done
            text += f", {per:.1f} s/step, ~{tqdm.format_interval(per * max(self.total - self.n, 0))} left"
        if self.postfix:
            text += " | " + " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return text

    def _write(self) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        print(self.line(), file=stream, flush=True)
        self.last_write, self.written = self.clock(), self.n


def progress_bar(total: int, initial: int, enabled: bool, *, every_s: float = 30.0, stream=None):
    """A tqdm bar over RL steps on a terminal, :class:`LineProgress` elsewhere, or a silent stand-in."""
    if not enabled:
        return _NoProgress()
    stream = stream if stream is not None else sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return LineProgress(total, initial, every_s, stream=stream)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="rpgrl train", dynamic_ncols=True, file=stream)
