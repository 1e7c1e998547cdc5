"""Name -> loss: the registry of built-in losses, entry points and ``module:function`` paths.

Every built-in RPG loss is (kernel, KL row): ``rpg_<div>`` = differentiable kernel with the
divergence's surrogate [Table 1/4, Algorithm 1], ``rpg_reinforce_<div>`` = REINFORCE kernel
with RPG-Style Clip [Table 2, Algorithm 2]; ``ppo`` = differentiable kernel without KL,
``grpo`` / ``grpo_corrected`` = differentiable kernel with GRPO's k3 rows (docs/math.md §5);
``gspo`` / ``cispo`` are ``rpgrl.losses.baselines``.

``LOSSES`` is the ONE place where a loss name is resolved: a built-in name, an installed
``rpgrl.losses`` entry point, or a ``module:function`` path (``rpgrl.losses.plugins``). The
config, ``RPGTrainer``, the verl plugin and ``rpgrl check-loss`` all ask ``LOSSES``, so a
user loss works everywhere once it resolves here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Optional

import torch
from torch import Tensor

from rpgrl.losses.baselines import cispo_token_loss, gspo_token_loss
from rpgrl.losses.clip import TrustRegion
from rpgrl.losses.divergences import DIVERGENCES, GRPO_KL, GRPO_KL_CORRECTED, Divergence
from rpgrl.losses.plugins import PluginError, entry_point_names, is_path, load_entry_point, load_path
from rpgrl.losses.spec import LossInputs, LossSpec, TokenLossFn
from rpgrl.losses.surrogates import differentiable_token_loss, reinforce_token_loss

__all__ = ["LossSpec", "LOSSES", "LossRegistry", "UnknownLossError", "resolve_loss"]

def _differentiable(divergence: Optional[Divergence]) -> TokenLossFn:
    def token_loss(x: LossInputs) -> tuple[Tensor, TrustRegion]:
        return differentiable_token_loss(
            x.logp, x.ratios(grad=True), x.advantages, x.beta, divergence, x.clip, x.dual_clip,
            x.kl_in_advantage,
        )

    return token_loss


def _reinforce(divergence: Divergence) -> TokenLossFn:
    def token_loss(x: LossInputs) -> tuple[Tensor, TrustRegion]:
        with torch.no_grad():
            ratios = x.ratios(grad=False)
        return reinforce_token_loss(x.logp, ratios, x.advantages, x.beta, divergence, x.clip, x.dual_clip)

    return token_loss


_GRPO_NOTE = (
    "beta*k3(pi_ref/pi_theta) is not importance weighted: sampled from pi_old its expected "
    "gradient is that of sum_y pi_old(y) k3(pi_ref(y)/pi_theta(y)), which equals the gradient of "
    "UFKL = KL(pi_ref || pi_theta) + mass term (the FORWARD KL for normalized policies), not of "
    "the reverse KL that k3 estimates, and only on-policy (w = 1); off-policy it matches no "
    "KL's gradient (docs/math.md §5). Its fixed point is still pi_theta = pi_ref."
)


def _build_registry() -> dict[str, LossSpec]:
    reg: dict[str, LossSpec] = {}
    for key, div in DIVERGENCES.items():
        reg[f"rpg_{key}"] = LossSpec(
            f"rpg_{key}", "differentiable", div,
            f"RPG, D = {div.D}: dual-clip -w*A + beta*surrogate (Table 1/4, Algorithm 1)",
            _differentiable(div), objective=key,
            coefficient=f"g_t = w*A + C_KL, C_KL = {div.coefficient}; the w*A part is 0 outside the "
                        "dual-clip trust region (sign of A), C_KL always flows",
        )
    for key, div in DIVERGENCES.items():
        reg[f"rpg_reinforce_{key}"] = LossSpec(
            f"rpg_reinforce_{key}", "reinforce", div,
            f"RPG-REINFORCE, D = {div.D}: -SG(g)*logp with RPG-Style Clip (Table 2, Algorithm 2)",
            _reinforce(div), objective=key,
            coefficient=f"g_t = w*A + C_KL, C_KL = {div.coefficient}; the whole g_t is 0 outside the "
                        "RPG-Style Clip region (sign of psi = (A + C_KL/w)*nll)",
        )
    reg["ppo"] = LossSpec("ppo", "differentiable", None, "dual-clip PPO, no KL term",
                          _differentiable(None), objective="none", uses_beta=False,
                          coefficient="g_t = w*A, 0 outside the dual-clip trust region")
    reg["grpo"] = LossSpec(
        "grpo", "differentiable", GRPO_KL,
        "PPO clip + beta*k3(pi_ref/pi_theta), not importance weighted (biased off-policy)",
        _differentiable(GRPO_KL), objective="urkl", note=_GRPO_NOTE,
        coefficient=f"g_t = w*A + {GRPO_KL.coefficient}; the w*A part is 0 outside the clip region",
    )
    reg["grpo_corrected"] = LossSpec(
        "grpo_corrected", "differentiable", GRPO_KL_CORRECTED,
        "PPO clip + beta*w*k3(pi_ref/pi_theta): KL gradient = URKL's (the paper's fix)",
        _differentiable(GRPO_KL_CORRECTED), objective="urkl",
        coefficient=f"g_t = w*A + {GRPO_KL_CORRECTED.coefficient}; the w*A part is 0 outside the clip region",
    )
    reg["gspo"] = LossSpec(
        "gspo", "gspo", None,
        "GSPO: PPO clip on the sequence-level ratio exp(mean_t log w), no KL (arXiv 2507.18071)",
        gspo_token_loss, objective="none", uses_beta=False, uses_dual_clip=False,
        coefficient="g_t = s_i*A (s_i = exp(mean_t log w_t), the sequence's ratio), 0 where the "
                    "sequence is clipped",
        note="every token of a sequence is weighted by the sequence's geometric-mean ratio s_i, "
             "not by its own w_t: exact on-policy (s_i = 1), biased off-policy",
    )
    reg["cispo"] = LossSpec(
        "cispo", "cispo", None,
        "CISPO: -SG(clip(w, 1-eps_low, 1+eps_high))*A*logp, every token keeps a gradient, no KL "
        "(arXiv 2506.13585)",
        cispo_token_loss, objective="none", uses_beta=False, uses_dual_clip=False,
        coefficient="g_t = clip(w, 1-eps_low, 1+eps_high)*A (never 0: no token is stopped)",
        note="the clipped weight truncates the importance correction: exact only where "
             "1-eps_low <= w <= 1+eps_high",
    )
    return reg


class UnknownLossError(ValueError, KeyError):
    """A loss name that is neither built in, nor an entry point, nor an importable path."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class LossRegistry(Mapping):
    """name -> LossSpec. Built-ins first, then ``rpgrl.losses`` entry points, then
    ``module:function`` paths (loaded on first use and cached). Iteration lists the built-ins
    and the installed entry points (without loading them)."""

    def __init__(self, builtins: dict[str, LossSpec]):
        self._builtins = builtins
        self._loaded: dict[str, LossSpec] = {}

    @property
    def builtins(self) -> dict[str, LossSpec]:
        return dict(self._builtins)

    def resolve(self, name: str) -> LossSpec:
        """The LossSpec for ``name``; raises UnknownLossError that says why not."""
        if not isinstance(name, str):
            raise UnknownLossError(f"loss name must be a string, got {name!r}")
        spec = self._builtins.get(name) or self._loaded.get(name)
        if spec is not None:
            return spec
        try:
            spec = load_path(name) if is_path(name) else load_entry_point(name)
        except PluginError as exc:
            raise UnknownLossError(str(exc)) from exc
        if spec is None:
            raise UnknownLossError(
                f"{name!r} is not one of the known losses: {', '.join(self)} (built-in and installed "
                f"'rpgrl.losses' entry points), nor a 'package.module:function' path"
            )
        self._loaded[name] = spec
        return spec

    def forget(self, name: str) -> None:
        """Drop a loaded plugin (tests, or after reinstalling a package)."""
        self._loaded.pop(name, None)

    def __getitem__(self, name: str) -> LossSpec:
        return self.resolve(name)

    def __contains__(self, name: object) -> bool:
        try:
            self.resolve(name)  # type: ignore[arg-type]
        except UnknownLossError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        yield from self._builtins
        for name in entry_point_names():
            if name not in self._builtins:
                yield name

    def __len__(self) -> int:
        return sum(1 for _ in self)


#: name -> LossSpec for every loss ``policy_loss`` accepts (see LossRegistry).
LOSSES = LossRegistry(_build_registry())


def resolve_loss(name: str) -> LossSpec:
    """``LOSSES.resolve``: the spec of a built-in, entry-point or ``module:function`` loss."""
    return LOSSES.resolve(name)
