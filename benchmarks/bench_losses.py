"""Time every loss in ``rpgrl.losses.LOSSES`` (forward + backward) relative to ``ppo``.

    python benchmarks/bench_losses.py                       # B=512, T=4096, CPU float32
    python benchmarks/bench_losses.py --anchor separate --out docs/bench_losses.md

The target is <= 1.5x ppo for every RPG loss. Inputs are synthetic: logp in
[-3, 0], log-ratios ~ N(0, 0.1^2), right-padded responses of random length, default
hyper-parameters (clip (0.2, 0.28), dual clip 10, beta 1e-4, token-mean). Both wall time
and process CPU time are reported: on a shared machine wall time is noisy, CPU time much
less so. Losses are interleaved round by round so that noise hits all of them alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from rpgrl.losses import LOSSES, policy_loss


def make_inputs(B: int, T: int, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    logp = -3 * torch.rand(B, T, generator=g)
    old = logp + 0.1 * torch.randn(B, T, generator=g)
    anchor = logp + 0.1 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    to = dict(device=device, dtype=dtype)
    return logp.to(**to), old.to(**to), anchor.to(**to), adv.to(**to), mask.to(device)


def time_loss(name: str, inputs, anchor: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of one forward + backward."""
    logp0, old, anc, adv, mask = inputs
    logp = logp0.clone().requires_grad_(True)
    if logp.is_cuda:
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    loss, _ = policy_loss(name, logp, old, adv, mask, anc if anchor else None)
    loss.backward()
    if logp.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def run(B: int, T: int, repeats: int, anchor: bool, device: str) -> str:
    inputs = make_inputs(B, T, device, torch.float32)
    names = list(LOSSES)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats + 1):  # round 0 is a warm-up
        for n in names:
            w, c = time_loss(n, inputs, anchor)
            if r:
                wall[n].append(w)
                cpu[n].append(c)
    mw = {n: statistics.median(v) for n, v in wall.items()}
    mc = {n: statistics.median(v) for n, v in cpu.items()}
    lines = [
        f"B={B}, T={T}, {device} float32, anchor={'separate' if anchor else 'rollout'}, "
        f"median of {repeats}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}",
        "",
        "| loss | wall ms (fwd+bwd) | x ppo (wall) | CPU ms | x ppo (CPU) |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {n} | {1e3 * mw[n]:.1f} | {mw[n] / mw['ppo']:.2f} | {1e3 * mc[n]:.1f} | "
        f"{mc[n] / mc['ppo']:.2f} |"
        for n in names
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--anchor", choices=["rollout", "separate"], default="rollout")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table = run(args.batch, args.seq, args.repeats, args.anchor == "separate", args.device)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


if __name__ == "__main__":
    main()
