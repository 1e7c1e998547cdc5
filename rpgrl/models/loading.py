"""Loading the policy: any AutoModelForCausalLM + tokenizer, optional LoRA, device/dtype."""

from __future__ import annotations

import copy
from pathlib import Path

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU unless the config says otherwise."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_policy(path: str | Path, *, device: torch.device, dtype: torch.dtype,
                trust_remote_code: bool = False, gradient_checkpointing: bool = False,
                lora=None):
    """A trainable causal LM on ``device``; ``lora`` is rpgrl's LoraConfig or None."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise RuntimeError(
            f"model.path={path!s}: could not load a causal LM from it ({exc}). Give a local "
            "directory written by save_pretrained, or a hub name reachable from this machine."
        ) from exc
    if gradient_checkpointing:  # renamed to activation checkpointing in transformers 5
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.config.use_cache = False
    if lora is not None and lora.enabled:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError("model.lora.enabled=true needs peft: pip install 'rpgrl[lora]'") from exc
        target = lora.target_modules
        model = get_peft_model(model, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=target if target == "all-linear" else [t.strip() for t in target.split(",")],
            task_type="CAUSAL_LM",
        ))
    disable_dropout(model)
    model.to(device)
    model.train()
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """RL needs pi_old, pi_theta and the anchor to be one deterministic function of the weights
    (w = 1 on-policy); dropout would make every log-prob pass a different policy. verl and TRL
    turn it off too. Covers nn.Dropout (incl. LoRA's) and HF attention-dropout attributes."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "attn_dropout", "dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)


def frozen_copy(model):
    """A no-grad snapshot of the policy (anchor / reference model)."""
    snap = copy.deepcopy(model)
    snap.eval()
    snap.requires_grad_(False)
    return snap


def save_final(model, tokenizer, out_dir: str | Path) -> Path:
    """``save_pretrained`` (safetensors); LoRA adapters are merged so the result loads anywhere."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    to_save = model
    if hasattr(model, "merge_and_unload"):
        to_save = copy.deepcopy(model).merge_and_unload()
    to_save.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
