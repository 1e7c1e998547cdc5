"""Loading the policy: any AutoModelForCausalLM + tokenizer, optional LoRA, device and
numeric precision (:class:`Precision`; docs/precision.md)."""

from __future__ import annotations

import contextlib
import copy
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The *parameter* dtype of an inference-only model (``rpgrl eval --dtype``): bf16 where
    the hardware does bf16 well (:func:`bf16_hardware`), else fp32. Training never stores
    bf16 parameters: it uses :func:`resolve_precision`."""
    if name == "auto":
        return torch.bfloat16 if bf16_hardware(device)[0] else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


#: /proc/cpuinfo flags of x86 CPUs with bf16 matmul instructions (Sapphire Rapids and later:
#: AMX tiles; Cooper Lake / Zen 4 and later: AVX512-BF16 dot products).
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpuinfo_values(key: str, cpuinfo: str | None = None) -> list[str]:
    """The values of every ``key : value`` line of /proc/cpuinfo (``cpuinfo``: its text; read when
    None, and no values where there is none, e.g. macOS)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    out = []
    for line in cpuinfo.splitlines():
        k, _, value = line.partition(":")
        if k.strip() == key:
            out.append(value.strip())
    return out


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The :data:`CPU_BF16_FLAGS` this CPU has (``cpuinfo``: the text of /proc/cpuinfo; none
    without one: those CPUs fall back to fp32)."""
    flags = {f for value in cpuinfo_values("flags", cpuinfo) for f in value.split()}
    return [f for f in CPU_BF16_FLAGS if f in flags]


def bf16_hardware(device: torch.device | str, cpuinfo: str | None = None) -> tuple[bool, str]:
    """Whether ``device`` multiplies bf16 matrices natively (faster than fp32), and why."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"CUDA device {name} supports bf16"
        return False, f"CUDA device {name} has no native bf16"
    if device.type == "cpu":
        found = cpu_bf16_flags(cpuinfo)
        if found:
            return True, f"this CPU has {' and '.join(found)}"
        return False, (f"this CPU has neither {' nor '.join(CPU_BF16_FLAGS)} (bf16 would be emulated, "
                       "slower than fp32)")
    return False, f"no bf16 detection for device type {device.type!r}"


@dataclass(frozen=True)
class Precision:
    """How the policy's numbers are stored and computed (docs/precision.md).

    Parameters, gradients, optimizer state and checkpoints are always ``param_dtype`` =
    fp32 ("master weights": an lr-1e-5 Adam update is below bf16 resolution for most
    weights). ``compute_dtype`` bf16 = mixed precision: the decoder's matmuls run in bf16
    under ``torch.autocast`` (FSDP2: ``MixedPrecisionPolicy``), while the LM head, the
    log-softmax, log-probs, importance weights, KL and the loss stay fp32.
    """

    param_dtype: torch.dtype
    compute_dtype: torch.dtype
    reason: str

    @property
    def mixed(self) -> bool:
        return self.compute_dtype != self.param_dtype

    def describe(self) -> str:
        """One log line: what was chosen and why."""
        what = ("bf16 mixed precision (bf16 matmuls; fp32 weights, optimizer state, LM head, "
                "log-probs and loss)" if self.mixed else "fp32")
        return f"precision: {what} -- {self.reason}"

    def autocast(self, device: torch.device | str):
        """The context every policy forward runs in: bf16 autocast when mixed, else a no-op."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=self.compute_dtype)

    def prepare(self, model: torch.nn.Module) -> None:
        """Give ``model`` an fp32 LM head when mixed: the sampler's logits (``model(...)``
        under :meth:`autocast`) then come from the same fp32 head as the trainer's log-probs
        (``rpgrl.models.logprobs``), so the policy that samples is the one that is scored."""
        if self.mixed:
            fp32_output_head(model)


FP32 = torch.float32
BF16 = torch.bfloat16


def resolve_precision(name: str, device: torch.device, cpuinfo: str | None = None) -> Precision:
    """``model.dtype`` -> :class:`Precision`. ``auto``: bf16 mixed precision where the hardware
    does bf16 well (:func:`bf16_hardware`: CUDA with bf16; a CPU with AMX or AVX512-BF16),
    fp32 elsewhere. ``bfloat16`` / ``float32`` force it. Parameters are fp32 either way."""
    ok, why = bf16_hardware(device, cpuinfo)
    if name == "auto":
        return Precision(FP32, BF16 if ok else FP32, f"model.dtype=auto: {why}")
    if name == "bfloat16":
        note = "" if ok else f"; {why}"
        return Precision(FP32, BF16, f"model.dtype=bfloat16{note}")
    if name == "float32":
        return Precision(FP32, FP32, "model.dtype=float32")
    raise ValueError(f"model.dtype must be one of auto, float32, bfloat16 for training, got {name!r} "
                     "(fp16 needs loss scaling, which rpgrl does not do: use bfloat16)")


def _fp32_linear_forward(self: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """An ``nn.Linear`` forward outside autocast, in the weight's dtype (fp32 master)."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return F.linear(hidden.to(self.weight.dtype), self.weight, getattr(self, "bias", None))


def fp32_output_head(model: torch.nn.Module) -> None:
    """Run ``model``'s output embedding (LM head) outside autocast, in its fp32 weights.

    A bound method on the instance: the state dict is untouched and ``copy.deepcopy`` (the
    anchor snapshot) rebinds it to the copy's own head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{type(base).__name__}: the LM head is {type(head).__name__}, not an nn.Linear; "
                        "bf16 mixed precision needs a plain linear head (use model.dtype=float32)")
    head.forward = types.MethodType(_fp32_linear_forward, head)


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
            raise RuntimeError("model.lora.enabled=true needs peft: pip install peft (or pip install -e '.[lora]' in the rpgrl clone)") from exc
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


def load_model(path: str, *, device: torch.device, precision: Precision, gguf_file: str | None = None,
               cache_dir: str | None = None, trust_remote_code: bool = False,
               gradient_checkpointing: bool = False, lora=None, log=print):
    """(model, tokenizer, resolved path) for ``model.path``: the one loading path of
    ``rpgrl train`` and ``rpgrl eval`` (a GGUF file becomes a cached folder; parameters in
    ``precision.param_dtype``, prepared for its compute dtype)."""
    from rpgrl.models.gguf import resolve_model_path

    path = resolve_model_path(path, gguf_file, cache_dir=cache_dir, log=log)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model = load_policy(path, device=device, dtype=precision.param_dtype, trust_remote_code=trust_remote_code,
                        gradient_checkpointing=gradient_checkpointing, lora=lora)
    precision.prepare(model)
    return model, tokenizer, path


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
