"""Prove a loss's gradient by exact enumeration (behind ``rpgrl check-loss``; docs/math.md §2-4).

The claim of every KL-regularized policy loss (Props. E.1, E.3, 3.2, 3.6; Table 1/2/4) is
per token: sampling y_t from pi_old, E_old[grad loss] = -grad J with
J = sum_t ( E_{pi_theta,t}[A_t] - beta * D(pi_theta,t, pi_anc,t) ). ``check_loss`` tests it
without sampling: a policy over a small vocabulary (K outcomes) at each of T positions,
every one of the K^T sequences fed through ``policy_loss`` (shape [1, T], plus one padding
column full of nan that must stay inert), weighted by its exact pi_old probability, in
float64, and compared with autograd's gradient of J, for three cases (on-policy; off-policy;
off-policy with unnormalized measures, where the mass terms of UFKL/URKL matter) and both
anchors (the rollout policy, docs/math.md §1.1, mode 1; a separate one, modes 2-3).

The clip-region checks use a random [B, T] batch with clipping on (eps = (0.2, 0.28), dual
clip c = 3): (1) every token the loss's TrustRegion leaves unclipped has exactly the
unclipped gradient; (2) tokens it reports as gradient-stopped carry no advantage gradient
(doubling A changes nothing there). A loss that clips must report its TrustRegion.

When a case fails, the report lists which objective the expected gradient does match, if
any (e.g. GRPO's unweighted k3: the forward KL's gradient, on-policy only).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from rpgrl.losses.clip import TrustRegion
from rpgrl.losses.policy import policy_loss, run_token_loss
from rpgrl.losses.registry import LOSSES
from rpgrl.losses.spec import OBJECTIVES, LossInputs

__all__ = [
    "ANCHORS", "OBJECTIVES", "CheckReport", "Enumeration", "check_loss", "exact_divergence",
    "exact_objective_gradient", "expected_loss_gradient", "explain_rows",
]

DT = torch.float64
ANCHORS = ("rollout", "separate")
CASES = ("on-policy", "off-policy", "unnormalized")
CLIP = (0.2, 0.28)
DUAL_CLIP = 3.0


def exact_divergence(objective: str, logp: Tensor, anc_logp: Tensor) -> Tensor:
    """D of docs/math.md §2 by enumeration over the last dim; log-measures may be unnormalized."""
    if objective == "none":
        return logp.sum() * 0.0
    p, q = logp.exp(), anc_logp.exp()
    fkl = (q * (anc_logp - logp)).sum()
    rkl = (p * (logp - anc_logp)).sum()
    table = {"fkl": fkl, "rkl": rkl, "ufkl": fkl + (p - q).sum(), "urkl": rkl + (q - p).sum()}
    if objective not in table:
        raise ValueError(f"objective {objective!r}: expected one of {OBJECTIVES}")
    return table[objective]


@dataclass
class Enumeration:
    """A policy over K outcomes at each of T positions, as [T, K] tables: ``theta`` (the
    parameters; ``log_policy(theta)`` gives log pi_theta, over the last dim), ``old_logp``
    (the sampler), ``anc_logp`` (None = the rollout policy) and the advantages ``adv``."""

    theta: Tensor
    old_logp: Tensor
    anc_logp: Optional[Tensor]
    adv: Tensor
    log_policy: Callable[[Tensor], Tensor]


def _problem(case: str, anchor: str, K: int, T: int, seed: int) -> Enumeration:
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(T, K, generator=g, dtype=DT)
    old = theta.clone() if case == "on-policy" else theta + 0.5 * torch.randn(T, K, generator=g, dtype=DT)
    anc = theta + 0.7 * torch.randn(T, K, generator=g, dtype=DT)
    adv = torch.randn(T, K, generator=g, dtype=DT)
    softmax = lambda t: torch.log_softmax(t, -1)  # noqa: E731
    # the sampler is always a distribution; pi_theta and a separate anchor may be measures
    log_policy = (lambda t: t) if case == "unnormalized" else softmax
    old_logp = softmax(old)
    anc_logp = None if anchor == "rollout" else log_policy(anc)
    return Enumeration(theta, old_logp, anc_logp, adv, log_policy)


def expected_loss_gradient(name: str, pb: Enumeration, beta: float) -> Tensor:
    """sum over all K^T sequences y of pi_old(y) * grad_theta policy_loss(y), unclipped,
    token-mean over the T tokens (plus a padding column of nan that must stay inert)."""
    T, K = pb.theta.shape
    theta = pb.theta.clone().requires_grad_(True)
    lp = pb.log_policy(theta)
    pos = torch.arange(T)
    nan = torch.full((1, 1), math.nan, dtype=DT)
    mask = torch.ones(1, T + 1, dtype=torch.bool)
    mask[0, -1] = False
    total = theta.sum() * 0.0
    for seq in itertools.product(range(K), repeat=T):
        y = torch.tensor(seq)
        logp = torch.cat([lp[pos, y][None], lp[:1, :1]], dim=1)  # padding: a live entry of theta
        old = torch.cat([pb.old_logp[pos, y][None], nan], dim=1)
        anc = None if pb.anc_logp is None else torch.cat([pb.anc_logp[pos, y][None], nan], dim=1)
        adv = torch.cat([pb.adv[pos, y][None], nan], dim=1)
        loss, _ = policy_loss(name, logp, old, adv, mask, anc, beta=beta, clip=None, dual_clip=None)
        total = total + pb.old_logp[pos, y].sum().exp() * loss
    (grad,) = torch.autograd.grad(total, theta, allow_unused=True)
    return torch.zeros_like(theta) if grad is None else grad


def exact_objective_gradient(objective: str, pb: Enumeration, beta: float) -> Tensor:
    """-grad J / T (token-mean over T tokens) with J = sum_t E_theta[A_t] - beta * D_t."""
    T = pb.theta.shape[0]
    theta = pb.theta.clone().requires_grad_(True)
    lp = pb.log_policy(theta)
    anc = pb.old_logp if pb.anc_logp is None else pb.anc_logp
    J = (lp.exp() * pb.adv).sum() - beta * sum(exact_divergence(objective, lp[t], anc[t]) for t in range(T))
    (grad,) = torch.autograd.grad(J, theta)
    return -grad / T


@dataclass
class CaseResult:
    case: str
    anchor: str
    max_dev: float
    scale: float
    ok: bool
    matches: list[str]


@dataclass
class ClipResult:
    anchor: str
    what: str
    value: Optional[float]  # None: not applicable (said in ``what``)
    ok: bool


@dataclass
class CheckReport:
    loss: str
    objective: str
    beta: float
    tol: float
    cases: list[CaseResult] = field(default_factory=list)
    clip: list[ClipResult] = field(default_factory=list)
    note: str = ""

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.cases) and all(c.ok for c in self.clip)

    def format(self) -> str:
        spec = LOSSES[self.loss]
        lines = [
            f"check-loss {self.loss} ({spec.source}): {spec.description}",
            f"objective: J = E[A] - beta*D, D = {self.objective} (beta = {self.beta:g}); float64 "
            f"exact enumeration, tolerance {self.tol:.0e} x max|grad J|",
            "",
            f"{'case':<14} {'anchor':<9} {'max |E grad L + grad J|':>24} {'max |grad J|':>12}  result  "
            "expected gradient matches D =",
        ]
        for c in self.cases:
            lines.append(
                f"{c.case:<14} {c.anchor:<9} {c.max_dev:>24.3e} {c.scale:>12.3e}  "
                f"{'ok' if c.ok else 'FAIL':<6}  {', '.join(c.matches) or 'none of ' + '/'.join(OBJECTIVES)}"
            )
        lines += ["", "clip-region checks (eps = (0.2, 0.28), dual clip c = 3):"]
        for c in self.clip:
            val = "" if c.value is None else f" max dev {c.value:.3e}"
            lines.append(f"  [{c.anchor}] {'ok  ' if c.ok else 'FAIL'} {c.what}{val}")
        if not self.passed and self.note:
            lines += ["", f"known: {self.note}"]
        lines += ["", f"{'PASS' if self.passed else 'FAIL'}: {self.loss} "
                      f"{'is' if self.passed else 'is NOT'} an exact gradient of E[A] - beta*{self.objective}"]
        return "\n".join(lines)


def _clip_batch(anchor: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, T = 16, 6
    logp = -torch.rand(B, T, generator=g, dtype=DT) * 3 - 0.05
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    return dict(
        logp=logp, old=logp + 0.6 * torch.randn(B, T, generator=g, dtype=DT),
        anc=None if anchor == "rollout" else logp + 0.4 * torch.randn(B, T, generator=g, dtype=DT),
        adv=0.5 * torch.randn(B, generator=g, dtype=DT), mask=mask,
    )


def _token_grad(name: str, d: dict, adv: Tensor, beta: float, clip, dual) -> Tensor:
    logp = d["logp"].clone().requires_grad_(True)
    loss, _ = policy_loss(name, logp, d["old"], adv, d["mask"], d["anc"], beta=beta, clip=clip, dual_clip=dual)
    (grad,) = torch.autograd.grad(loss, logp, allow_unused=True)
    return torch.zeros_like(logp) if grad is None else grad


def _region(name: str, d: dict, adv: Tensor, beta: float) -> TrustRegion:
    x = LossInputs(d["logp"], d["old"], torch.where(d["mask"], adv[:, None], 0.0), d["mask"], d["anc"],
                   beta, CLIP, DUAL_CLIP)
    return run_token_loss(LOSSES[name], x)[1]


def _clip_checks(name: str, anchor: str, beta: float, seed: int) -> list[ClipResult]:
    d = _clip_batch(anchor, seed)
    valid = d["mask"]
    g_clip = _token_grad(name, d, d["adv"], beta, CLIP, DUAL_CLIP)
    g_free = _token_grad(name, d, d["adv"], beta, None, None)
    region = _region(name, d, d["adv"], beta)
    clipped = [m for m in (region.upper, region.lower, region.dual, region.stopped) if m is not None]
    scale = max(float(g_free.abs().max()), 1e-300)
    out = []
    if not clipped:
        out.append(ClipResult(anchor, "the loss reports no clipped token (no TrustRegion masks): "
                              "its clipped and unclipped gradients must then agree everywhere", None, True))
        inside = valid
    else:
        any_clip = torch.stack(clipped).any(0) & valid
        frac = float(any_clip.sum()) / float(valid.sum())
        out.append(ClipResult(anchor, f"clipping exercised: {frac:.0%} of tokens in a clip region",
                              None, 0 < frac < 1))
        inside = valid & ~any_clip
    dev = float((g_clip - g_free)[inside].abs().max()) if inside.any() else 0.0
    out.append(ClipResult(anchor, "inside the trust region: gradient == unclipped gradient", dev,
                          dev <= 1e-12 * scale))
    if region.stopped is None:
        out.append(ClipResult(anchor, "no token is gradient-stopped (every token keeps a gradient)", None, True))
    else:
        adv2 = 2 * d["adv"]
        both = region.stopped & _region(name, d, adv2, beta).stopped & valid
        g2 = _token_grad(name, d, adv2, beta, CLIP, DUAL_CLIP)
        dev2 = float((g_clip - g2)[both].abs().max()) if both.any() else 0.0
        out.append(ClipResult(anchor, f"gradient-stopped tokens ({int(both.sum())}) carry no advantage "
                              "gradient (A -> 2A changes nothing)", dev2, dev2 <= 1e-12 * scale))
    return out


def check_loss(
    name: str,
    objective: Optional[str] = None,
    anchors: tuple[str, ...] = ANCHORS,
    *,
    beta: float = 0.3,
    K: int = 3,
    T: int = 3,
    seed: int = 0,
    tol: float = 1e-10,
) -> CheckReport:
    """Exact-enumeration check of loss ``name`` against ``objective`` (default: the loss's own
    claim, ``LossSpec.objective``). beta is large by default so that a wrong KL gradient
    cannot hide below the tolerance."""
    spec = LOSSES.resolve(name)
    objective = objective or spec.objective
    if objective not in OBJECTIVES:
        raise ValueError(f"check-loss {name}: pass --objective, one of {OBJECTIVES} (the loss declares "
                         f"{spec.objective!r})")
    for a in anchors:
        if a not in ANCHORS:
            raise ValueError(f"check-loss: anchor {a!r}, expected one of {ANCHORS}")
    report = CheckReport(name, objective, beta, tol, note=spec.note)
    for anchor in anchors:
        for i, case in enumerate(CASES):
            pb = _problem(case, anchor, K, T, seed + i)
            got = expected_loss_gradient(name, pb, beta)
            exact = {o: exact_objective_gradient(o, pb, beta) for o in OBJECTIVES}
            scale = max(float(exact[objective].abs().max()), 1.0)
            devs = {o: float((got - e).abs().max()) for o, e in exact.items()}
            matches = [o for o in OBJECTIVES if devs[o] <= tol * max(float(exact[o].abs().max()), 1.0)]
            report.cases.append(CaseResult(case, anchor, devs[objective], float(exact[objective].abs().max()),
                                           devs[objective] <= tol * scale, matches))
        report.clip.extend(_clip_checks(name, anchor, beta, seed + 10))
    return report


def explain_rows(
    name: str, beta: float, clip: Optional[tuple[float, float]], dual_clip: Optional[float],
    anchor: str = "rollout", kl_in_advantage: bool = False,
) -> list[dict]:
    """Per-token gradient coefficient g = -dL/dlogp (so that the update is g * grad log pi) of
    loss ``name`` for a grid of importance weights w and advantages A, split into the reward
    part (beta = 0) and the KL part (the rest), one token per sequence (sum aggregation).
    With a separate anchor, rho = w/v with v = pi_anc/pi_old = 0.8."""
    ws = [0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 5.0]
    grid = [(w, a) for a in (1.0, -1.0) for w in ws]
    n = len(grid)
    logp = torch.full((n, 1), -1.0, dtype=DT)
    old = logp - torch.tensor([[math.log(w)] for w, _ in grid], dtype=DT)
    anc = None if anchor == "rollout" else old + math.log(0.8)
    adv = torch.tensor([a for _, a in grid], dtype=DT)
    mask = torch.ones(n, 1, dtype=torch.bool)

    def coef(b: float) -> Tensor:
        lp = logp.clone().requires_grad_(True)
        loss, _ = policy_loss(name, lp, old, adv, mask, anc, beta=b, clip=clip, dual_clip=dual_clip,
                              kl_in_advantage=kl_in_advantage and b > 0, norm=1.0)
        (g,) = torch.autograd.grad(loss, lp, allow_unused=True)
        return torch.zeros_like(lp) if g is None else -g

    total, reward = coef(beta), coef(0.0)
    x = LossInputs(logp, old, adv[:, None], mask, anc, beta, clip, dual_clip, kl_in_advantage)
    region = run_token_loss(LOSSES[name], x)[1]

    def flag(m: Optional[Tensor], i: int) -> bool:
        return m is not None and bool(m[i, 0])

    rows = []
    for i, (w, a) in enumerate(grid):
        where = [k for k, m in (("upper", region.upper), ("lower", region.lower), ("dual", region.dual))
                 if flag(m, i)]
        rows.append(dict(w=w, A=a, g=float(total[i, 0]), reward=float(reward[i, 0]),
                         kl=float(total[i, 0] - reward[i, 0]), clipped="/".join(where) or "-",
                         stopped=flag(region.stopped, i)))
    return rows
