"""RPG losses inside TRL: ``RPGTrainer`` (a ``GRPOTrainer``) and ``RPGConfig`` (a ``GRPOConfig``).

    from rpgrl.integrations.trl import RPGConfig, RPGTrainer
    args = RPGConfig(output_dir="out", rpg_loss="rpg_reinforce_ufkl", num_iterations=2)
    RPGTrainer(model="Qwen/Qwen3-4B", reward_funcs=my_reward, args=args, train_dataset=ds).train()

Only the loss changes: ``_compute_loss`` hands TRL's per-token log-probs, rollout log-probs,
advantages and completion mask to ``rpgrl.losses.policy_loss`` (docs/math.md §2-6). Generation (incl.
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
        "rpgrl.integrations.trl needs TRL: pip install 'trl>=1.9.2,!=1.15.0,<2' (or pip install -e '.[trl]' in the rpgrl clone)"
    ) from exc

from rpgrl.losses import AGG_MODES, LOSSES, MAX_METRIC_KEYS, policy_loss

__all__ = ["ANCHORS", "TRL_TESTED", "VLLM_IS_MODES", "RPGConfig", "RPGTrainer", "rpg_norm", "token_weights"]

#: The TRL versions this adapter is tested with (it overrides GRPOTrainer internals).
TRL_TESTED = ">=1.9.2,!=1.15.0,<2"
#: rpg_anchor values: the KL anchor pi_anc of docs/math.md §1.1.
ANCHORS = ("rollout", "reference")
#: TRL's vllm_importance_sampling_mode values (how it truncates or masks the ratio r).
VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
#: Multimodal / packing inputs GRPOTrainer forwards to the policy; passed through untouched.
_FORWARD_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)


def _fail(key: str, value: Any, expected: str) -> None:
    raise ValueError(f"RPGConfig.{key}={value!r}: {expected}")


@dataclass
class RPGConfig(GRPOConfig):
    """GRPOConfig + the RPG loss. Defaults follow the paper's recipe (docs/math.md §7): beta 1e-4,
    clip (epsilon, epsilon_high) = (0.2, 0.28), dual clip 10, token-mean, advantages
    R - mean_group (``scale_rewards="none"``), KL anchor = rollout policy (no reference model).
    """

    rpg_loss: str = field(
        default="rpg_reinforce_ufkl",
        metadata={"help": f"rpgrl loss name, one of {', '.join(LOSSES)}."},
    )
    rpg_dual_clip: Optional[float] = field(
        default=10.0, metadata={"help": "Dual-clip constant c > 1 for A < 0 (docs/math.md §3, §4.1); None disables."}
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
        # Options that bypass RPGTrainer._compute_loss or change what reaches it (docs/trl.md, "Audit").
        if self.use_liger_kernel:
            _fail("use_liger_kernel", True, "TRL 1.9-1.13 (at least) sends the loss to "
                  "GRPOTrainer.compute_liger_loss (TRL's own GRPO loss: no RPG KL term, no dual clip) instead "
                  "of _compute_loss, and TRL 1.16 deprecates the flag; for fused layer kernels use "
                  "model_init_kwargs={'use_kernels': True}")
        if not getattr(self, "use_bias_correction_kl", True):
            _fail("use_bias_correction_kl", False, "RPG's KL terms are importance-weighted by construction "
                  "(docs/math.md §2); for GRPO's uncorrected k3 penalty choose rpg_loss='grpo'")
        mode = self.vllm_importance_sampling_mode
        if self.use_vllm and self.vllm_importance_sampling_correction and mode not in VLLM_IS_MODES:
            _fail("vllm_importance_sampling_mode", mode, f"expected one of {VLLM_IS_MODES}")


def token_weights(like: Tensor, *factors: Optional[Tensor]) -> Optional[Tensor]:
    """Product of TRL's per-token loss multipliers, detached, as a [B, T] tensor shaped like
    ``like`` (None when there is none): the vLLM correction r ([B, T] for token_* modes, [B, 1]
    for sequence_* modes; truncated, or 0 where TRL masks it), the high-entropy mask and the
    off-policy sequence mask ([B, 1]).

    They multiply each token's whole RPG loss, exactly where TRL multiplies its per-token loss,
    and change neither w = pi_theta/pi_old (so the clip, dual clip and KL term act on the
    policy change since sampling, docs/math.md §1, §3, §4.1) nor any denominator (a masked token still
    counts, as in TRL). Why r also weights the KL term: the gradient of docs/math.md §2 is E_old[g_t grad lp_t]
    for the whole g_t, and r = pi_old/pi_vllm turns the sampler's expectation into pi_old's.
    """
    out = None
    for f in factors:
        if f is None:
            continue
        f = f.detach().to(like.dtype)
        out = f if out is None else out * f
    return None if out is None else out.expand_as(like)


def rpg_norm(count: float, num_processes: int, accumulation_steps: int, steps_per_generation: int,
             training: bool) -> float:
    """Per-process aggregation denominator so that the optimizer step's loss is the global
    mean (docs/math.md §6): ``count`` is the generation batch's count over all processes (tokens for
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
    ``ref_per_token_logps`` with rpg_anchor="reference"; advantages; completion_mask (x tool mask);
    ``weights`` = TRL's per-token multipliers (vLLM ratio r, entropy / off-policy masks, see
    ``token_weights``), so w = pi_theta/pi_old stays the ratio of docs/math.md §1 even under vLLM.
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
        args._validate_rpg()  # again: fields set after construction must not slip past the checks
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

        # TRL's per-token multipliers, applied where TRL applies them (see token_weights).
        entropy_mask = off_policy_mask = is_ratio = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
        if self.off_policy_mask_threshold is not None:
            off_policy_mask = self.get_off_policy_mask(
                advantages[:, None] if advantages.dim() == 1 else advantages, logp,
                inputs.get("sampling_per_token_logps", old), mask, self.off_policy_mask_threshold,
            )
        if self.use_vllm and self.vllm_importance_sampling_correction:
            is_ratio = inputs["importance_sampling_ratio"]  # r ~ pi_old / pi_vllm, TRL-truncated or masked
        weights = token_weights(logp, is_ratio, entropy_mask, off_policy_mask)

        anchor = None  # rollout anchor: pi_anc = pi_old, so rho = w (docs/math.md §1.1)
        if args.rpg_anchor == "reference" and self.beta != 0.0:
            anchor = inputs["ref_per_token_logps"]

        mode = "train" if self.model.training else "eval"
        count_key = "num_items_in_batch" if args.rpg_agg == "token-mean" else "rpg_num_seqs_in_batch"
        norm = rpg_norm(
            inputs[count_key].item(), self.accelerator.num_processes,
            self.current_gradient_accumulation_steps, args.steps_per_generation, mode == "train",
        )
        loss, metrics = policy_loss(
            args.rpg_loss, logp, old, advantages, valid, anchor,
            beta=self.rpg_beta, clip=(self.epsilon_low, self.epsilon_high), dual_clip=args.rpg_dual_clip,
            agg=args.rpg_agg, kl_in_advantage=args.rpg_kl_in_advantage, norm=norm, weights=weights,
        )
        if self.aux_loss_enabled:  # MoE router loss, scaled for accumulation as TRL does
            accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_rpg_metrics(mode, metrics, entropies, valid)
        return loss

    def _log_rpg_metrics(self, mode: str, metrics: dict[str, Tensor], entropies: Tensor, valid: Tensor) -> None:
        """rpgrl's metrics under ``rpg/<key>`` (process mean; max for ``MAX_METRIC_KEYS``),
        plus TRL's ``entropy``; one collective for all of them."""
        keys = sorted(metrics)
        ent = torch.where(valid, entropies.detach(), 0.0).sum() / valid.sum().clamp(min=1)
        local = torch.stack([metrics[k].detach().float().reshape(()) for k in keys] + [ent.float()])
        rows = self.accelerator.gather(local[None]).reshape(-1, local.numel())
        for i, key in enumerate(keys):
            col = rows[:, i]
            value = col.max() if key in MAX_METRIC_KEYS else col.mean()
            self._metrics[mode][f"rpg/{key}"].append(value.item())
        self._metrics[mode]["entropy"].append(rows[:, -1].mean().item())
