"""A torchrun worker that finished ends with exit code 0 through ``exit_process`` even when a
gloo thread still holds a collective's tensor as the worker exits (real ``torchrun``, gloo, 2 CPU
processes).

The race ``rpgrl.parallel.distributed.exit_process`` avoids: a gloo worker thread frees a
Python-made tensor after the interpreter began finalizing, Python ends that thread inside a C++
destructor and the runtime aborts ("terminate called without an active exception", SIGABRT).
CI hit it once in a worker of ``tests/test_fsdp_consistency.py``. The worker below makes it
likely instead of rare: each rank posts an all-reduce and exits at once (rank 0 a second later),
holding the process group past ``destroy_process_group`` as an FSDP model's mesh does. Ending
through plain interpreter exit (``MODE=finalize``, the control) it aborted in 14 of 20 runs on a
2-core CPU; through ``exit_process`` in 0 of 20, and the atexit handlers ran.

Run as a script (``torchrun --nproc_per_node 2 tests/test_distributed_exit.py MODE DIR``) this
file is the worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _worker(mode: str, out_dir: str) -> None:
    import atexit
    import time

    import torch
    import torch.distributed as dist

    from rpgrl.parallel.distributed import exit_process, init_distributed

    ctx = init_distributed("cpu", timeout_s=60)  # registers destroy_process_group at exit
    out = Path(out_dir)
    atexit.register(lambda: (out / f"atexit.rank{ctx.rank}").write_text(str(dist.is_initialized())))
    dist.barrier()
    if ctx.rank == 0:
        time.sleep(1.0)  # rank 1 is exiting by now
    main = sys.modules["__main__"]
    main.group = dist.group.WORLD  # held past destroy_process_group, as an FSDP model's mesh holds it
    work = dist.all_reduce(torch.ones(1000), async_op=True)
    del work  # in flight: only gloo's thread holds the tensor now
    if mode == "exit_process":
        exit_process(0)
    assert mode == "finalize", mode  # the control: plain interpreter exit


def _torchrun(mode: str, out: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, mode, str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.medium
def test_exit_process_ends_a_finished_worker_cleanly_with_a_collective_in_flight(tmp_path):
    r = _torchrun("exit_process", tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "terminate called" not in r.stdout + r.stderr
    # the atexit handlers ran: both markers, and init_distributed's handler (registered
    # first, so it runs last) had not destroyed the process group yet when they ran
    for rank in (0, 1):
        assert (tmp_path / f"atexit.rank{rank}").read_text() == "True"


if __name__ == "__main__":
    _worker(*sys.argv[1:])
