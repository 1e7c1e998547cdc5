"""Metric sinks: JSONL flushed per line, resume truncation, TensorBoard, W&B fallback."""

from __future__ import annotations

import json
import math
import os
import sys
import types

import pytest

from rpgrl.loop.tracking import Tracker, read_metrics


def test_jsonl_written_and_flushed_per_line(tmp_path):
    tr = Tracker(tmp_path, tensorboard=False)
    tr.log({"reward/mean": 0.5, "actor/entropy": 1.25}, step=1)
    tr.log({"reward/mean": float("nan"), "note": "x"}, step=2)
    # read while still open: a killed run keeps what it logged
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 1, "reward/mean": 0.5, "actor/entropy": 1.25}
    assert json.loads(lines[1]) == {"step": 2, "reward/mean": None, "note": "x"}  # valid JSON
    recs = read_metrics(tmp_path)
    assert recs[0] == {"step": 1, "reward/mean": 0.5, "actor/entropy": 1.25}
    assert math.isnan(recs[1]["reward/mean"])
    tr.close()
    tr.close()  # idempotent


def test_tensor_values_and_bad_inputs(tmp_path):
    torch = pytest.importorskip("torch")
    with Tracker(tmp_path, tensorboard=False) as tr:
        tr.log({"a": torch.tensor(2.5), "b": 3}, step=0)
        with pytest.raises(ValueError, match="'step'"):
            tr.log({"step": 1}, step=1)
        with pytest.raises(TypeError, match="metric 'a'.*not a number"):
            tr.log({"a": [1, 2]}, step=1)
        with pytest.raises(TypeError, match="metric 'vec'.*not a scalar"):
            tr.log({"ok": 1.0, "vec": torch.tensor([1.0, 2.0])}, step=1)
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 0, "a": 2.5, "b": 3}]


def test_read_tolerates_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a"')
    with pytest.warns(RuntimeWarning, match="truncated last line 3"):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1}\n{"step": 2, "a"\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_metrics(path)
    with pytest.raises(FileNotFoundError, match="nope"):
        read_metrics(tmp_path / "nope")


def test_resume_truncates_to_resume_step(tmp_path):
    with Tracker(tmp_path, tensorboard=False) as tr:
        for s in range(1, 6):
            tr.log({"a": float(s)}, step=s)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "a": 6')  # killed mid-line
    with pytest.warns(RuntimeWarning, match="truncated"):
        tr = Tracker(tmp_path, tensorboard=False, resume_step=3)
    tr.log({"a": 40.0}, step=4)
    tr.close()
    recs = read_metrics(tmp_path)
    assert [(r["step"], r["a"]) for r in recs] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_non_resume_on_existing_file_warns(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.warns(RuntimeWarning, match="not a resume"):
        Tracker(tmp_path, tensorboard=False).close()


def test_tensorboard_scalars(tmp_path):
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    with Tracker(tmp_path) as tr:
        tr.log({"reward/mean": 0.25, "tag": "ignored"}, step=1)
        tr.log({"reward/mean": 0.75}, step=2)
        tr.log({"reward/mean": 0.5}, step=3)
    with Tracker(tmp_path, resume_step=2) as tr:  # resumed: step 3 is logged again
        tr.log({"reward/mean": 1.0}, step=3)
    acc = ea_mod.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert acc.Tags()["scalars"] == ["reward/mean"]
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [(1, 0.25), (2, 0.75), (3, 1.0)]


def test_wandb_missing_warns_not_crashes(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.warns(RuntimeWarning, match="wandb.*not installed"):
        tr = Tracker(tmp_path, tensorboard=False, wandb=True, wandb_project="p")
    tr.log({"a": 1.0}, step=1)
    tr.close()
    assert read_metrics(tmp_path) == [{"step": 1, "a": 1.0}]


def test_wandb_used_when_installed_and_resumes_same_run(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        id = "run123"

        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with Tracker(tmp_path, tensorboard=False, wandb=True, wandb_project="p", run_name="r", config={"lr": 1}) as tr:
        tr.log({"a": 1.0, "s": "text"}, step=3)
    assert calls[0][1]["project"] == "p" and calls[0][1]["config"] == {"lr": 1} and calls[0][1]["id"] is None
    assert calls[1:] == [("log", {"a": 1.0}, 3), ("finish",)]
    Tracker(tmp_path, tensorboard=False, wandb=True, resume_step=3).close()
    assert calls[3][1]["id"] == "run123" and calls[3][1]["resume"] == "allow"


def _open_files_under(path) -> list[str]:
    fd_dir = "/proc/self/fd"
    out = []
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith(str(path)):
            out.append(target)
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_failing_wandb_init_leaves_no_sink_open(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")

    def init(**kw):
        raise RuntimeError("wandb login required")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with pytest.raises(RuntimeError, match="login required") as excinfo:
        Tracker(tmp_path, tensorboard=True, wandb=True, wandb_project="p")
    # While the traceback (and so the half-built Tracker) is alive, nothing may be open:
    # neither metrics.jsonl nor the TensorBoard event file.
    assert excinfo.tb is not None
    assert _open_files_under(tmp_path.resolve()) == []


class _Stream:
    """A write target that says whether it is a terminal."""

    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None: ...


def test_progress_without_a_terminal_writes_plain_lines_at_a_sane_rate():
    from rpgrl.loop.tracking import LineProgress, progress_bar

    out = _Stream(tty=False)
    assert isinstance(progress_bar(10, 0, True, stream=out), LineProgress)
    now = [0.0]
    bar = LineProgress(10, 2, 30.0, stream=out, clock=lambda: now[0])  # resumed at step 2
    for _ in range(8):
        now[0] += 12.0
        bar.update(1)
        bar.set_postfix({"reward": "0.250"})
    bar.close()
    lines = out.text.splitlines()
    assert "\r" not in out.text
    # the first step, then at most one line per 30 s (steps take 12 s: every 3rd), then the last
    assert [ln.split(",")[0] for ln in lines] == ["rpgrl train: step 3/10 (30%)", "rpgrl train: step 6/10 (60%)",
                                                 "rpgrl train: step 9/10 (90%)", "rpgrl train: step 10/10 (100%)"]
    assert lines[1] == "rpgrl train: step 6/10 (60%), 00:48 elapsed, 12.0 s/step, ~00:48 left | reward=0.250"


def test_progress_on_a_terminal_is_tqdm():
    from tqdm import tqdm

    from rpgrl.loop.tracking import progress_bar

    bar = progress_bar(3, 0, True, stream=_Stream(tty=True))
    try:
        assert isinstance(bar, tqdm)
    finally:
        bar.close()
