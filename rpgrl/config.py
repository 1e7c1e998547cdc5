"""Typed training config: defaults -> algorithm preset -> YAML file -> dotted overrides.

Everything is validated here, before any model is loaded, and every error names the key,
the value and what is allowed, so a typo in a 3-day cluster job fails in the first second.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A bad config key or value; the message names the key and what is allowed."""


@dataclass
class TinyConfig:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str = "all-linear"


@dataclass
class ModelConfig:
    path: str | None = None  # HF hub name or local dir; None = the built-in tiny model
    # a .gguf file inside model.path (a folder); model.path may also be a .gguf file itself or
    # pkg:PACKAGE/file.gguf (a file shipped in an installed package). De-quantized once, cached
    gguf_file: str | None = None
    tiny: TinyConfig = field(default_factory=TinyConfig)
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class WarmstartConfig:
    """Supervised warm start of the built-in tiny model (cached; re-runs skip it)."""

    enabled: bool = True
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    teacher_accuracy: float = 0.35  # the teacher is otherwise off by one (see data/procedural.py)
    cache_dir: str | None = None  # default: $RPGRL_CACHE or ~/.cache/rpgrl


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # empty = the procedural task
    val_files: list[str] = field(default_factory=list)
    max_prompt_length: int = 1024
    prompt_overlong: str = "truncate_left"  # truncate_left | drop | error
    on_bad_row: str = "error"  # error | skip
    test_size: int = 256  # procedural task: held-out problems
    # procedural task (no train_files): arith = "37+48" for the tiny model; arith_chat = "What is
    # 37 + 48? Reply as: Answer: <number>" for pretrained chat models (rpgrl.rewards.arith_chat)
    task: str = "arith"
    operand_min: int = 10  # procedural task: operands a, b in [operand_min, operand_max]
    operand_max: int = 99


@dataclass
class RolloutConfig:
    n: int = 8  # responses per prompt (G)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8
    batch_size: int = 256  # sequences per generate() call
    # auto: rpgrl's KV-cached sampler (each prompt prefilled once for its n samples, finished
    # rows dropped) when the model's cache allows it, else HF generate; rpgrl | hf to force one
    engine: str = "auto"


@dataclass
class AnchorConfig:
    """KL anchor (spec 1.1): rollout | periodic | adaptive | fixed."""

    mode: str = "rollout"
    period: int = 20  # periodic: refresh every K optimizer steps
    kappa: float = 0.05  # adaptive: refresh when the KL moving average exceeds kappa
    ema: float = 0.9  # adaptive: moving-average factor


@dataclass
class DynamicSamplingConfig:
    enabled: bool = False
    max_gen_batches: int = 4


@dataclass
class OverlongConfig:
    enabled: bool = False
    buffer_len: int = 4
    penalty_factor: float = 1.0


@dataclass
class AlgorithmConfig:
    name: str = "rpg_reinforce_ufkl"  # preset; see PRESETS
    loss: str = "rpg_reinforce_ufkl"
    advantage: str = "rpg"
    beta: float = 1e-4
    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_c: float | None = 10.0  # dual clip; None = off
    agg: str = "token-mean"
    kl_in_advantage: bool = False
    kl_in_reward: float = 0.0  # REINFORCE++: coefficient of the k1 KL folded into the reward
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    overlong: OverlongConfig = field(default_factory=OverlongConfig)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | schedulefree_adamw
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0


@dataclass
class TrainerConfig:
    total_steps: int = 60
    prompts_per_step: int = 32
    mini_batch_size: int = 8  # prompts per optimizer step: 4 off-policy updates per batch
    micro_batch_size: int = 64  # sequences per forward/backward
    epochs: int = 1
    save_every: int = 20
    keep_last: int = 3
    eval_every: int = 10
    max_consecutive_skips: int = 5
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int = 0  # CPU threads; 0 = torch's default
    logprob_chunk_size: int = 1024
    profile: bool = False  # print the step-time breakdown (timing/* means) at the end
    # under torchrun: shard the policy with FSDP2 (fully_shard per decoder layer + root)
    # instead of replicating it with a manual gradient all-reduce (docs/scaling.md)
    fsdp: bool = False
    # log-prob/training forwards run each distinct prompt of a micro-batch once and reuse its
    # KV for the responses (exact: same values and gradients; rpgrl.prefix); false = padded
    share_prompts: bool = True


@dataclass
class EvalConfig:
    k: int = 1  # samples per problem (mean@k, pass@k)
    temperature: float = 0.0  # 0 = greedy
    max_problems: int = 0  # 0 = all
    max_new_tokens: int = 0  # 0 = rollout.max_new_tokens
    before_training: bool = True


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "rpgrl"
    run_name: str | None = None
    progress: bool = True


@dataclass
class Config:
    output_dir: str = "runs/default"
    seed: int = 0
    reward_fn: str | None = None  # "module:function" with verl's compute_score signature
    reward_timeout_s: float = 10.0
    model: ModelConfig = field(default_factory=ModelConfig)
    warmstart: WarmstartConfig = field(default_factory=WarmstartConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# --------------------------------------------------------------------------- presets

_RPG = dict(advantage="rpg", beta=1e-4, clip_low=0.2, clip_high=0.28, clip_c=10.0,
            kl_in_reward=0.0, dynamic_sampling={"enabled": False})
#: One word sets the paper's hyperparameters (spec sections 5 and 7); any field stays overridable.
PRESETS: dict[str, dict[str, Any]] = {
    "grpo": dict(loss="grpo", advantage="grpo", beta=1e-3, clip_low=0.2, clip_high=0.2,
                 clip_c=None, kl_in_reward=0.0, anchor={"mode": "fixed"},
                 dynamic_sampling={"enabled": False}, overlong={"enabled": False}),
    "grpo_corrected": dict(loss="grpo_corrected", advantage="grpo", beta=1e-3, clip_low=0.2,
                           clip_high=0.2, clip_c=None, kl_in_reward=0.0, anchor={"mode": "fixed"},
                           dynamic_sampling={"enabled": False}),
    "dapo": dict(loss="ppo", advantage="grpo", beta=0.0, clip_low=0.2, clip_high=0.28,
                 clip_c=10.0, kl_in_reward=0.0, dynamic_sampling={"enabled": True},
                 overlong={"enabled": True}),
    "reinforce_pp": dict(loss="ppo", advantage="reinforce_pp", beta=0.0, clip_low=0.2,
                         clip_high=0.2, clip_c=None, kl_in_reward=1e-3, anchor={"mode": "fixed"},
                         dynamic_sampling={"enabled": False}),
    "reinforce_pp_baseline": dict(loss="grpo", advantage="reinforce_pp_baseline", beta=1e-3,
                                  clip_low=0.2, clip_high=0.2, clip_c=None, kl_in_reward=0.0,
                                  anchor={"mode": "fixed"}, dynamic_sampling={"enabled": False}),
    "ppo": dict(loss="ppo", advantage="grpo", beta=0.0, clip_low=0.2, clip_high=0.2, clip_c=10.0),
}
# The field's other baselines (issue 15; rpgrl.losses.baselines), as their papers set them.
# Dr. GRPO [arXiv 2503.20783]: PPO clip, A = R - mean_group (no std), no length normalization
# (token sums / sequences; the paper's extra constant 1/L_max only rescales the step).
PRESETS["dr_grpo"] = dict(loss="ppo", advantage="rpg", beta=0.0, clip_low=0.2, clip_high=0.2, clip_c=None,
                          agg="seq-mean-token-sum", kl_in_reward=0.0, dynamic_sampling={"enabled": False})
# GSPO [arXiv 2507.18071]: sequence-level ratio, clip (3e-4, 4e-4), sequence-mean aggregation.
PRESETS["gspo"] = dict(loss="gspo", advantage="grpo", beta=0.0, clip_low=3e-4, clip_high=4e-4, clip_c=None,
                       agg="seq-mean-token-mean", kl_in_reward=0.0, dynamic_sampling={"enabled": False})
# CISPO [arXiv 2506.13585]: truncated IS weight, token-mean; the paper sets no lower bound
# (1 - clip_low = 0.01 here, as config needs clip_low < 1) and ScaleRL's eps_max = 5 above.
PRESETS["cispo"] = dict(loss="cispo", advantage="grpo", beta=0.0, clip_low=0.99, clip_high=4.0, clip_c=None,
                        agg="token-mean", kl_in_reward=0.0, dynamic_sampling={"enabled": False})
for _kl in ("fkl", "rkl", "ufkl", "urkl"):
    PRESETS[f"rpg_{_kl}"] = dict(_RPG, loss=f"rpg_{_kl}")
    PRESETS[f"rpg_reinforce_{_kl}"] = dict(_RPG, loss=f"rpg_reinforce_{_kl}")

CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "data.prompt_overlong": ("truncate_left", "drop", "error"),
    "data.on_bad_row": ("error", "skip"),
    "data.task": ("arith", "arith_chat"),
    "algorithm.name": tuple(PRESETS),
    "algorithm.agg": ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"),
    "algorithm.anchor.mode": ("rollout", "periodic", "adaptive", "fixed"),
    "optim.name": ("adamw", "schedulefree_adamw"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "rollout.engine": ("auto", "rpgrl", "hf"),
}


# --------------------------------------------------------------------------- building


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a YAML/override value to the field's type, or raise a named error."""
    origin = get_origin(typ)
    if origin in (Union, types.UnionType):
        args = get_args(typ)
        if value is None and type(None) in args:
            return None
        last: ConfigError | None = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                last = exc
        raise last or ConfigError(f"{key}: cannot use {value!r}")
    if origin is list:
        if isinstance(value, (str, Path)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = get_args(typ)
        return [_coerce(key, v, inner) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {typ}")


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3)
            hint = f" Did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            raise ConfigError(
                f"unknown config key '{full}'.{hint} Allowed under "
                f"'{prefix.rstrip('.') or '<top>'}': {', '.join(names)}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of sub-keys, got {value!r}")
            _apply(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(full, value, hints[key]))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``a.b.c=value`` strings -> nested dict; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like dotted.key=value")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}': empty key part")
        value = yaml.safe_load(raw) if raw != "" else None
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{part}'")
        node[parts[-1]] = value
    return nested


def split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """Command-line items -> (optional CONFIG.yaml, dotted overrides)."""
    config_path, overrides = None, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config_path is None:
            config_path = item
        else:
            raise ConfigError(f"unexpected argument {item!r} (expected CONFIG.yaml then key=value overrides)")
    return config_path, overrides


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping; ``base: other.yaml`` (relative to the file) is merged underneath."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in _seen:
        raise ConfigError(f"config file {path}: 'base' chain loops back to itself")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: 'base' must be a path to another YAML file")
    return _merge(read_yaml(path.parent / base, (*_seen, path)), loaded)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """defaults -> preset named by ``algorithm.name`` -> YAML -> overrides, then validate."""
    raw = read_yaml(path) if path is not None else {}
    raw = _merge(raw, parse_overrides(overrides or []))
    cfg = Config()
    name = (raw.get("algorithm") or {}).get("name", cfg.algorithm.name)
    if name not in PRESETS:
        raise ConfigError(f"algorithm.name: unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    _apply(cfg.algorithm, PRESETS[name], "algorithm.")
    _apply(cfg, raw)
    validate(cfg)
    return cfg


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> None:
    """Cross-field checks; raises ConfigError naming the key and the allowed range."""
    from rpgrl.advantages import ADVANTAGES
    from rpgrl.losses import LOSSES

    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key}: {_get(cfg, key)!r} is not one of {', '.join(allowed)}")
    a, t, r = cfg.algorithm, cfg.trainer, cfg.rollout
    try:  # built-in, rpgrl.losses entry point or module:function (rpgrl.losses.registry)
        LOSSES.resolve(a.loss)
    except ValueError as exc:
        raise ConfigError(f"algorithm.loss: {exc}") from None
    if a.advantage not in ADVANTAGES:
        raise ConfigError(f"algorithm.advantage: {a.advantage!r} is not one of {', '.join(ADVANTAGES)}")
    checks = [
        ("algorithm.beta", a.beta >= 0, "must be >= 0"),
        ("algorithm.kl_in_reward", a.kl_in_reward >= 0, "must be >= 0"),
        ("algorithm.clip_low", 0 <= a.clip_low < 1, "must be in [0, 1)"),
        ("algorithm.clip_high", a.clip_high >= 0, "must be >= 0"),
        ("algorithm.clip_c", a.clip_c is None or a.clip_c > 1, "must be > 1 (dual clip) or null"),
        ("algorithm.anchor.period", a.anchor.period >= 1, "must be >= 1"),
        ("algorithm.anchor.kappa", a.anchor.kappa > 0, "must be > 0"),
        ("algorithm.anchor.ema", 0 <= a.anchor.ema < 1, "must be in [0, 1)"),
        ("algorithm.dynamic_sampling.max_gen_batches", a.dynamic_sampling.max_gen_batches >= 1, "must be >= 1"),
        ("algorithm.overlong.buffer_len", a.overlong.buffer_len >= 1, "must be >= 1"),
        ("rollout.n", r.n >= 1, "must be >= 1"),
        ("rollout.temperature", r.temperature > 0, "must be > 0"),
        ("rollout.top_p", 0 < r.top_p <= 1, "must be in (0, 1]"),
        ("rollout.max_new_tokens", r.max_new_tokens >= 1, "must be >= 1"),
        ("rollout.batch_size", r.batch_size >= 1, "must be >= 1"),
        ("optim.lr", cfg.optim.lr > 0, "must be > 0"),
        ("optim.weight_decay", cfg.optim.weight_decay >= 0, "must be >= 0"),
        ("optim.warmup_steps", cfg.optim.warmup_steps >= 0, "must be >= 0"),
        ("optim.grad_clip", cfg.optim.grad_clip > 0, "must be > 0"),
        ("trainer.total_steps", t.total_steps >= 1, "must be >= 1"),
        ("trainer.prompts_per_step", t.prompts_per_step >= 1, "must be >= 1"),
        ("trainer.mini_batch_size", t.mini_batch_size >= 1, "must be >= 1"),
        ("trainer.micro_batch_size", t.micro_batch_size >= 1, "must be >= 1"),
        ("trainer.epochs", t.epochs >= 1, "must be >= 1"),
        ("trainer.save_every", t.save_every >= 1, "must be >= 1"),
        ("trainer.keep_last", t.keep_last >= 1, "must be >= 1"),
        ("trainer.eval_every", t.eval_every >= 0, "must be >= 0 (0 = only before/after)"),
        ("trainer.max_consecutive_skips", t.max_consecutive_skips >= 1, "must be >= 1"),
        ("trainer.logprob_chunk_size", t.logprob_chunk_size >= 1, "must be >= 1"),
        ("data.max_prompt_length", cfg.data.max_prompt_length >= 1, "must be >= 1"),
        ("data.operand_min", cfg.data.operand_min >= 0, "must be >= 0"),
        ("data.operand_max", cfg.data.operand_max >= cfg.data.operand_min, "must be >= data.operand_min"),
        ("eval.k", cfg.eval.k >= 1, "must be >= 1"),
        ("eval.temperature", cfg.eval.temperature >= 0, "must be >= 0 (0 = greedy)"),
        ("reward_timeout_s", cfg.reward_timeout_s > 0, "must be > 0"),
        ("warmstart.steps", cfg.warmstart.steps >= 0, "must be >= 0"),
        ("warmstart.teacher_accuracy", 0 <= cfg.warmstart.teacher_accuracy <= 1, "must be in [0, 1]"),
    ]
    for key, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"{key}: {_get(cfg, key)!r} {allowed}")
    if t.prompts_per_step % t.mini_batch_size:
        raise ConfigError(
            f"trainer.mini_batch_size: {t.mini_batch_size} must divide trainer.prompts_per_step "
            f"({t.prompts_per_step})"
        )
    seqs = t.mini_batch_size * r.n
    if seqs % t.micro_batch_size:
        raise ConfigError(
            f"trainer.micro_batch_size: {t.micro_batch_size} must divide the sequences per "
            f"mini-batch, trainer.mini_batch_size * rollout.n = {seqs}"
        )
    if a.kl_in_reward > 0 and a.anchor.mode == "rollout":
        raise ConfigError(
            "algorithm.kl_in_reward: a KL folded into the reward needs a reference; with "
            "algorithm.anchor.mode=rollout it is identically 0. Use anchor.mode=fixed|periodic|adaptive"
        )
    if cfg.eval.k > 1 and cfg.eval.temperature == 0:
        raise ConfigError("eval.k: k > 1 samples per problem needs eval.temperature > 0")
    if a.overlong.enabled and a.overlong.buffer_len >= r.max_new_tokens:
        raise ConfigError(
            f"algorithm.overlong.buffer_len: {a.overlong.buffer_len} must be < rollout.max_new_tokens "
            f"({r.max_new_tokens})"
        )
    if cfg.model.path is None and cfg.data.task != "arith":
        raise ConfigError(f"data.task: the built-in tiny model only knows data.task=arith; set "
                          f"model.path for data.task={cfg.data.task}")
    if cfg.model.gguf_file and cfg.model.path is None:
        raise ConfigError("model.gguf_file: also set model.path (the folder that holds the file)")
    if cfg.model.path is None and cfg.data.train_files:
        raise ConfigError("model.path: the built-in tiny model only knows the procedural task; "
                          "set model.path when data.train_files is given")
    if cfg.data.val_files and not cfg.data.train_files:
        raise ConfigError("data.val_files: also set data.train_files (the procedural task has its own test split)")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
