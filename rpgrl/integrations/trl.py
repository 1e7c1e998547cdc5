"""RPG losses inside TRL: ``RPGTrainer`` (a ``GRPOTrainer``) and ``RPGConfig`` (a ``GRPOConfig``).

    from rpgrl.integrations.trl import RPGConfig, RPGTrainer
    args = RPGConfig(output_dir="out", rpg_loss="rpg_reinforce_ufkl", num_iterations=2)
    RPGTrainer(model="Qwen/Qwen3-4B", reward_funcs=my_reward, args=args, train_dataset=ds).train()

Only the loss changes: ``_compute_loss`` hands TRL's per-token log-probs, rollout log-probs,
advantages and completion mask to ``rpgrl.losses.policy_loss`` (spec 2-6). Generation (incl.
vLLM), rewards, advantages, PEFT and accelerate/DeepSpeed/FSDP stay TRL's. Tested with
``TRL_TESTED`` below; see docs/trl.md for the field mapping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "rpgrl.integrations.trl needs TRL: pip install 'trl>=1.9.2,!=1.15.0,<2' (or rpgrl[trl])"
    ) from exc

from rpgrl.losses import AGG_MODES, LOSSES, policy_loss

__all__ = ["ANCHORS", "TRL_TESTED", "RPGConfig", "RPGTrainer", "behaviour_logps", "rpg_norm"]

#: The TRL versions this adapter is tested with (it overrides GRPOTrainer internals).
TRL_TESTED = ">=1.9.2,!=1.15.0,<2"
#: rpg_anchor values: the KL anchor pi_anc of spec 1.1.
ANCHORS = ("rollout", "reference")
#: Multimodal / packing inputs GRPOTrainer forwards to the policy; passed through untouched.
_FORWARD_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)


def _fail(key: str, value: Any, expected: str) -> None:
    raise ValueError(f"RPGConfig.{key}={value!r}: {expected}")


@dataclass
class RPGConfig(GRPOConfig):
    """GRPOConfig + the RPG loss. Defaults follow the paper's recipe (spec 7): beta 1e-4,
    clip (epsilon, epsilon_high) = (0.2, 0.28), dual clip 10, token-mean, advantages
    R - mean_group (``scale_rewards="none"``), KL anchor = rollout policy (no reference model).
    """

    rpg_loss: str = field(
        default="rpg_reinforce_ufkl",
        metadata={"help": f"rpgrl loss name, one of {', '.join(LOSSES)}."},
    )
    rpg_dual_clip: Optional[float] = field(
        default=10.0, metadata={"help": "Dual-clip constant c > 1 for A < 0 (spec 3, 4.1); None disables."}
    )
    rpg_agg: str = field(
        default="token-mean",
        metadata={"help": f"Loss aggregation over the optimizer step's global batch, one of {AGG_MODES}."},
    )
    rpg_anchor: str = field(
        default="rollout",
        metadata={"help": "KL anchor: 'rollout' (old policy; no reference model) or 'reference' (TRL's ref model)."},
    )
    rpg_kl_in_advantage: bool = field(
        default=False, metadata={"help": "Algorithm 1's KL-in-advantage option (differentiable rpg_* losses)."}
    )
    # Paper defaults that differ from GRPOConfig's.
    beta: float = field(default=1e-4, metadata={"help": "RPG KL coefficient (paper default 1e-4)."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clip eps_low."})
    epsilon_high: Optional[float] = field(default=0.28, metadata={"help": "Upper clip eps_high (clip-higher)."})
    scale_rewards: str = field(
        default="none", metadata={"help": "RPG's advantage is R - mean_group: no std scaling."}
    )

    def __post_init__(self) -> None:
        self._validate_rpg()
        super().__post_init__()

    def _validate_rpg(self) -> None:
        if self.rpg_loss not in LOSSES:
            _fail("rpg_loss", self.rpg_loss, f"expected one of {', '.join(LOSSES)}")
        if self.rpg_agg not in AGG_MODES:
            _fail("rpg_agg", self.rpg_agg, f"expected one of {AGG_MODES}")
        if self.rpg_anchor not in ANCHORS:
            _fail("rpg_anchor", self.rpg_anchor, f"expected one of {ANCHORS}")
        if self.rpg_dual_clip is not None and not self.rpg_dual_clip > 1:
            _fail("rpg_dual_clip", self.rpg_dual_clip, "expected a number > 1 or None (no dual clip)")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta >= 0):
            _fail("beta", self.beta, "expected a finite KL coefficient >= 0")
        if not 0 <= self.epsilon < 1:
            _fail("epsilon", self.epsilon, "expected 0 <= epsilon < 1 (clip low bound 1 - epsilon)")
        if self.epsilon_high is not None and not self.epsilon_high >= 0:
            _fail("epsilon_high", self.epsilon_high, "expected >= 0 or None (= epsilon)")
        if self.rpg_kl_in_advantage and not LOSSES[self.rpg_loss].supports_kl_in_advantage:
            ok = [n for n, s in LOSSES.items() if s.supports_kl_in_advantage]
            _fail("rpg_kl_in_advantage", True, f"only the differentiable losses {ok} support it, not {self.rpg_loss!r}")
        # TRL options whose meaning the RPG loss replaces: refuse rather than silently ignore.
        if self.loss_type != "dapo":
            _fail("loss_type", self.loss_type, "RPGTrainer aggregates with rpg_agg; leave loss_type at 'dapo' "
                  "(rpg_agg='token-mean' ~ 'dapo', 'seq-mean-token-mean' ~ 'grpo', 'seq-mean-token-sum' ~ 'dr_grpo')")
        if self.importance_sampling_level != "token":
            _fail("importance_sampling_level", self.importance_sampling_level, "RPG weights are per token; use 'token'")
        if self.delta is not None:
            _fail("delta", self.delta, "use rpg_dual_clip for RPG's dual clip (TRL's delta is not applied)")
        if self.entropy_coef != 0.0 or self.use_adaptive_entropy:
            _fail("entropy_coef", self.entropy_coef, "the entropy bonus is not part of the RPG loss; set 0 and "
                  "use_adaptive_entropy=False")
        if self.sync_ref_model and self.rpg_anchor != "reference":
            _fail("sync_ref_model", True, "a synced reference model is the KL anchor only with rpg_anchor='reference'")


def behaviour_logps(old_logp: Tensor, mask: Tensor, is_ratio: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Log-probs of the policy that actually sampled, and the loss mask, under TRL's vLLM
    importance-sampling correction ``is_ratio`` r ~ pi_old/pi_vllm ([B, T] or [B, 1], truncated
    or 0 = masked by TRL).

    RPG's importance weight w is pi_theta over the *sampler* (spec 1), so we return
    log pi_old - log r and keep pi_old (the trainer's rollout-time policy) as the anchor: then
    v = r and every RPG gradient weight g_t becomes r * (its value against pi_old) — the same
    per-token factor TRL's own correction applies. Tokens with r = 0 leave the mask.
    """
    if is_ratio is None:
        return old_logp, mask
    r = is_ratio.to(old_logp.dtype).expand_as(old_logp)
    keep = r > 0
    sampler = torch.where(keep, old_logp - torch.log(torch.where(keep, r, 1.0)), old_logp)
    return sampler, mask & keep


def rpg_norm(count: float, num_processes: int, accumulation_steps: int, steps_per_generation: int,
             training: bool) -> float:
    """Per-process aggregation denominator so that the optimizer step's loss is the global
    mean (spec 6): ``count`` is the generation batch's count over all processes (tokens for
    token-mean, sequences for seq-mean-*); one optimizer step consumes accumulation_steps /
    steps_per_generation of it, and DDP averages gradients over processes. This is TRL's own
    "dapo" normalizer, exact when steps_per_generation == gradient_accumulation_steps (default).
    """
    norm = max(float(count), 1.0) / num_processes
    if training:
        norm = norm * accumulation_steps / steps_per_generation
    return norm


class RPGTrainer(GRPOTrainer):
    """GRPOTrainer whose loss is ``rpgrl.losses.policy_loss(args.rpg_loss, ...)``.

    Inputs per micro-batch (all from TRL): logp = current per-token log-probs; old_logp =
    ``old_per_token_logps`` — TRL computes them exactly when training is off-policy
    (num_iterations > 1 or steps_per_generation > gradient_accumulation_steps), otherwise the
    batch is on-policy and logp.detach() is exact; anchor = rollout policy, or
    ``ref_per_token_logps`` with rpg_anchor="reference"; advantages; completion_mask (x tool mask).
    With rpg_anchor="rollout" no reference model is loaded whatever beta is (TRL's internal
    ``self.beta`` is 0 there; the RPG coefficient is ``self.rpg_beta``).
    """

    _tag_names = ["trl", "rpg", "rpgrl"]
    _name = "RPG"
    _paper = {
        "title": "On the Design of KL-Regularized Policy Gradient Algorithms for LLM Reasoning",
        "id": "2505.17508",
        "citation": "@inproceedings{zhang2026rpg, title={On the Design of KL-Regularized Policy Gradient "
                    "Algorithms for LLM Reasoning}, author={Zhang, Yifan and Liu, Yifeng and Yuan, Huizhuo and "
                    "Gu, Quanquan and Yao, Andrew C}, booktitle={ICLR}, year={2026}}",
    }

    def __init__(self, model: Any, reward_funcs: Any = None, args: Optional[RPGConfig] = None,
                 *rest: Any, **kwargs: Any) -> None:
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = RPGConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1] or 'model'}-RPG")
        if not isinstance(args, RPGConfig):
            raise TypeError(f"RPGTrainer needs args=RPGConfig(...), got {type(args).__name__}; "
                            "RPGConfig accepts every GRPOConfig field plus rpg_*")
        self.rpg_beta = float(args.beta)
        # TRL loads a reference model (and scores it every batch) iff beta != 0 at construction.
        # The rollout anchor needs none, so TRL sees beta = 0 while it builds; args keeps the
        # user's value (logged configs stay truthful).
        user_beta = args.beta
        if args.rpg_anchor == "rollout":
            args.beta = 0.0
        try:
            super().__init__(model, reward_funcs, args, *rest, **kwargs)
        finally:
            args.beta = user_beta
        if args.rpg_anchor == "rollout":
            self.beta = 0.0  # TRL's "reference log-probs needed" switch

    # -- data -------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)
        if self.args.rpg_agg != "token-mean":  # tokens are TRL's num_items_in_batch already
            mask = out["completion_mask"]
            if out.get("tool_mask") is not None:
                mask = mask * out["tool_mask"]
            out["rpg_num_seqs_in_batch"] = self.accelerator.gather((mask != 0).any(-1).sum()).sum()
        return out

    # -- loss -------------------------------------------------------------------------------
    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> Tensor:
        args = self.args
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if inputs.get("tool_mask") is None else completion_mask * inputs["tool_mask"]
        logp, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, completion_mask], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{k: inputs.get(k) for k in _FORWARD_KEYS},
        )
        valid = mask != 0
        advantages = inputs["advantages"]
        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old

        loss_mask = valid
        if self.top_entropy_quantile < 1.0:
            loss_mask = loss_mask & (self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile) != 0)
        if self.off_policy_mask_threshold is not None:
            keep = self.get_off_policy_mask(
                advantages[:, None] if advantages.dim() == 1 else advantages, logp,
                inputs.get("sampling_per_token_logps", old), mask, self.off_policy_mask_threshold,
            )
            loss_mask = loss_mask & (keep != 0)

        anchor = None  # rollout anchor: pi_anc = pi_old, so rho = w (spec 1.1)
        if args.rpg_anchor == "reference" and self.beta != 0.0:
            anchor = inputs["ref_per_token_logps"]
        is_ratio = inputs.get("importance_sampling_ratio") if self.use_vllm else None
        if is_ratio is not None and anchor is None:
            anchor = old  # the sampler is vLLM; pi_old stays the anchor
        sampler, loss_mask = behaviour_logps(old, loss_mask, is_ratio)

        mode = "train" if self.model.training else "eval"
        count_key = "num_items_in_batch" if args.rpg_agg == "token-mean" else "rpg_num_seqs_in_batch"
        norm = rpg_norm(
            inputs[count_key].item(), self.accelerator.num_processes,
            self.current_gradient_accumulation_steps, args.steps_per_generation, mode == "train",
        )
        loss, metrics = policy_loss(
            args.rpg_loss, logp, sampler, advantages, loss_mask, anchor,
            beta=self.rpg_beta, clip=(self.epsilon_low, self.epsilon_high), dual_clip=args.rpg_dual_clip,
            agg=args.rpg_agg, kl_in_advantage=args.rpg_kl_in_advantage, norm=norm,
        )
        if self.aux_loss_enabled:  # MoE router loss, scaled for accumulation as TRL does
            accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_rpg_metrics(mode, metrics, entropies, valid)
        return loss

    def _log_rpg_metrics(self, mode: str, metrics: dict[str, Tensor], entropies: Tensor, valid: Tensor) -> None:
        """rpgrl's metrics under ``rpg/<key>`` (process mean; max for importance_weight_max),
        plus TRL's ``entropy``; one collective for all of them."""
        keys = sorted(metrics)
        ent = torch.where(valid, entropies.detach(), 0.0).sum() / valid.sum().clamp(min=1)
        local = torch.stack([metrics[k].detach().float().reshape(()) for k in keys] + [ent.float()])
        rows = self.accelerator.gather(local[None]).reshape(-1, local.numel())
        for i, key in enumerate(keys):
            col = rows[:, i]
            value = col.max() if key == "importance_weight_max" else col.mean()
            self._metrics[mode][f"rpg/{key}"].append(value.item())
        self._metrics[mode]["entropy"].append(rows[:, -1].mean().item())
