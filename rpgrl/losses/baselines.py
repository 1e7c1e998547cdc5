"""The field's other policy losses, as their papers and verl 0.9.1 define them.

Both follow the loss contract of ``rpgrl.losses.spec`` (per-token loss, masked and
aggregated by ``policy_loss``) and use no KL term (the papers use none; beta is ignored):

* **GSPO** (Zheng et al. 2025, arXiv 2507.18071; verl ``compute_policy_loss_gspo``): the
  importance ratio is the sequence's length-normalised likelihood ratio
  s_i = exp(mean_t log w_it), clipped PPO-style on the sequence, loss -A * clip-branch(s_i).
  Its gradient flows through every token as s_it = SG(s_i) * pi_theta(y_it)/SG(pi_theta(y_it)),
  so grad s_it = s_i * grad log pi_theta(y_it) and, with ``seq-mean-token-mean``, the
  sequence gets s_i * A_i * (1/|y_i|) sum_t grad log pi_theta — the paper's gradient.
  No dual clip (neither the paper nor verl has one).
* **CISPO** (MiniMax-M1, arXiv 2506.13585; verl ``compute_policy_loss_cispo``): the IS weight
  is clipped and stop-gradded, loss -SG(clip(w, 1-eps_low, 1+eps_high)) * A * log pi_theta,
  so every token keeps a gradient (none is stopped, unlike PPO's clip); token-mean.

Dr. GRPO (Liu et al. 2025, arXiv 2503.20783) needs no new loss: it is PPO's clipped loss with
A = R - mean_group (no std division) and a length-independent aggregation; see the
``dr_grpo`` preset in ``rpgrl.config``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rpgrl.algorithm.kl import LOG_RATIO_MAX
from rpgrl.losses.clip import TrustRegion, trust_region
from rpgrl.losses.spec import LossInputs

__all__ = ["cispo_token_loss", "gspo_token_loss", "sequence_log_ratio"]


def sequence_log_ratio(log_w: Tensor, mask: Tensor) -> Tensor:
    """log s_i = (1/|y_i|) sum_t log w_it over valid tokens, [B, 1] (GSPO, Eq. 7)."""
    lengths = mask.sum(dim=-1, keepdim=True).clamp(min=1).to(log_w.dtype)
    return torch.where(mask, log_w, 0.0).sum(dim=-1, keepdim=True) / lengths


def gspo_token_loss(x: LossInputs) -> tuple[Tensor, TrustRegion]:
    """GSPO's token loss -A * clip-branch(s_it): sequence-level ratio and clip decision."""
    with torch.no_grad():
        log_s = sequence_log_ratio(x.ratios(grad=False).log_w, x.mask)
    # log s_it = SG(log s_i) + logp - SG(logp); masked positions carry 0 (never exp(nan))
    token_part = torch.where(x.mask, x.logp - x.logp.detach(), 0.0)
    s_tok = (log_s + token_part).clamp(max=LOG_RATIO_MAX).exp()
    region = trust_region(x.advantages >= 0, s_tok, x.clip, None)
    return -(x.advantages * region.ratio), region


def cispo_token_loss(x: LossInputs) -> tuple[Tensor, TrustRegion]:
    """CISPO's token loss -SG(clip(w)) * A * log pi_theta; clipped tokens keep their gradient."""
    with torch.no_grad():
        w = x.ratios(grad=False).w
        region = TrustRegion(w)
        if x.clip is not None:
            eps_low, eps_high = x.clip
            region.upper = w > 1.0 + eps_high
            region.lower = w < 1.0 - eps_low
            region.ratio = w.clamp(1.0 - eps_low, 1.0 + eps_high)
    logp = torch.where(x.mask, x.logp, 0.0)
    return -(region.ratio * x.advantages) * logp, region
