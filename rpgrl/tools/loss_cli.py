"""``rpgrl check-loss`` and ``rpgrl explain``: prove a loss's gradient, show what a config optimises.

    rpgrl check-loss rpg_reinforce_urkl                 # exact-enumeration proof, exit 1 on FAIL
    rpgrl check-loss my_pkg.losses:my_loss --objective urkl --anchor separate
    rpgrl explain algorithm.preset=grpo                   # per-token gradient coefficient of a config

Both resolve loss names through ``rpgrl.losses.LOSSES``, so built-ins, ``rpgrl.losses``
entry points and ``module:function`` paths all work.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_subcommands", "explain_text"]


def _check_cmd(args: argparse.Namespace) -> int:
    from rpgrl.losses import UnknownLossError
    from rpgrl.losses.check import ANCHORS, check_loss

    anchors = tuple(args.anchor) if args.anchor else ANCHORS
    try:
        report = check_loss(args.name, args.objective, anchors, beta=args.beta)
    except (UnknownLossError, ValueError) as exc:
        print(f"rpgrl check-loss: {exc}", file=sys.stderr)
        return 2
    print(report.format())
    return 0 if report.passed else 1


def explain_text(cfg) -> str:
    """What ``cfg.algorithm`` optimises, token by token (``rpgrl explain``)."""
    from rpgrl.losses import LOSSES
    from rpgrl.losses.check import explain_rows

    a = cfg.algorithm
    spec = LOSSES.resolve(a.loss)
    clip = (a.clip_low, a.clip_high)
    anchor = "rollout" if a.anchor.mode == "rollout" else "separate"
    anchor_words = {
        "rollout": "rollout policy (pi_anc = pi_old: rho = w, v = 1; docs/math.md §1.1, mode 1)",
        "periodic": f"snapshot refreshed every {a.anchor.period_optimizer_steps} optimizer steps (rho != w)",
        "adaptive": f"snapshot refreshed when the KL moving average exceeds {a.anchor.kappa:g} (rho != w)",
        "fixed": "the initial policy, frozen (GRPO's reference; rho != w)",
    }[a.anchor.mode]
    denom = {"token-mean": "the mini-batch's valid tokens",
             "seq-mean-token-sum": "the mini-batch's sequences (token sums)",
             "seq-mean-token-mean": "the mini-batch's sequences (each a token mean)"}.get(a.agg, a.agg)
    lines = [
        f"algorithm {a.name}: loss {spec.name} ({spec.source})",
        f"  {spec.description}",
        f"  advantage A: {a.advantage}" + (f"; k1 KL folded into the reward x {a.kl_in_reward:g}"
                                           if a.kl_in_reward else ""),
        f"  beta = {a.beta:g}" + ("" if spec.uses_beta else f" (not used by {spec.name}: no KL term)")
        + f"; clip (eps_low, eps_high) = {clip}; dual clip c = {a.dual_clip}"
        + ("" if spec.uses_dual_clip else f" (not used by {spec.name})")
        + (f"; KL folded into the clipped advantage (Algorithm 1)" if a.kl_in_advantage else ""),
        f"  KL anchor: {anchor_words}",
        f"  loss = sum of token losses / {denom} (algorithm.agg = {a.agg})",
        "",
        "per-token gradient coefficient g_t: the update is sum_t g_t * grad log pi_theta(y_t) / denominator,",
        "w = pi_theta/pi_old, rho = pi_theta/pi_anc, v = pi_anc/pi_old",
        f"  {spec.coefficient or 'plugin loss: no closed form given; measured below'}",
    ]
    if spec.note:
        lines.append(f"  caveat: {spec.note}")
    rows = explain_rows(spec.name, a.beta, clip, a.dual_clip, anchor, a.kl_in_advantage)
    sep = "" if anchor == "rollout" else " (separate anchor, v = 0.8: rho = w/0.8)"
    lines += ["", f"measured by autograd (one token per sequence){sep}:",
              f"{'w':>6} {'A':>5} {'g_t':>12} {'reward part':>12} {'KL part':>12}  clip region  w-gradient"]
    for r in rows:
        lines.append(f"{r['w']:>6g} {r['A']:>+5g} {r['g'] + 0.0:>12.5g} {r['reward'] + 0.0:>12.5g} "
                     f"{r['kl'] + 0.0:>12.3e}  "
                     f"{r['clipped']:<11}  {'stopped' if r['stopped'] else 'flows'}")
    return "\n".join(lines)


def _explain_cmd(args: argparse.Namespace) -> int:
    from rpgrl.config import ConfigError, load_config, split_config_args
    from rpgrl.losses import UnknownLossError

    try:
        cfg = load_config(*split_config_args(args.items))
        print(explain_text(cfg))
    except (ConfigError, UnknownLossError) as exc:
        print(f"rpgrl explain: {exc}", file=sys.stderr)
        return 2
    return 0


def add_subcommands(subparsers) -> None:
    """Register ``check-loss`` and ``explain`` on an ``add_subparsers()`` object (rpgrl.cli)."""
    from rpgrl.losses.check import ANCHORS, OBJECTIVES

    c = subparsers.add_parser(
        "check-loss", help="prove a loss's gradient by exact enumeration (exit 1 on FAIL)",
        description="Exact-enumeration check (float64, small vocabulary, short sequences, on- and "
                    "off-policy, both anchors) that E_old[grad loss] = -grad(E[A] - beta*D), plus "
                    "clip-region checks. NAME: a built-in loss, an 'rpgrl.losses' entry point, or "
                    "'package.module:function'.")
    c.add_argument("name", metavar="NAME")
    c.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help="the divergence D to prove against (default: what the loss declares)")
    c.add_argument("--anchor", choices=ANCHORS, action="append", default=None,
                   help="KL anchor: the rollout policy or a separate one (default: both; repeatable)")
    c.add_argument("--beta", type=float, default=0.3,
                   help="KL coefficient of the check (large, so a wrong KL gradient shows; default 0.3)")
    c.set_defaults(func=_check_cmd)
    e = subparsers.add_parser(
        "explain", help="print the per-token gradient coefficient a config's algorithm implies")
    e.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value",
                   help="the same config and overrides as rpgrl train")
    e.set_defaults(func=_explain_cmd)
