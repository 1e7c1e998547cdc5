"""Typed training config: defaults -> algorithm preset -> YAML file -> dotted overrides.

Everything is validated here, before any model is loaded, and every error names the key,
the value and what is allowed, so a typo in a 3-day cluster job fails in the first second.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A bad config key or value; the message names the key and what is allowed."""


def _f(default: Any, doc: str) -> Any:
    """A config field with its one-line description (``rpgrl train --help-config``)."""
    if dataclasses.is_dataclass(default) or isinstance(default, type):
        factory = default if isinstance(default, type) else type(default)
        return field(default_factory=factory, metadata={"doc": doc})
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class TinyConfig:
    hidden_size: int = _f(128, "width of the built-in tiny Qwen2-style model")
    num_layers: int = _f(4, "decoder layers of the tiny model")
    num_heads: int = _f(4, "attention heads of the tiny model")
    intermediate_size: int = _f(512, "MLP width of the tiny model")


@dataclass
class LoraConfig:
    enabled: bool = _f(False, "train LoRA adapters (PEFT) instead of the full model")
    r: int = _f(16, "LoRA rank")
    alpha: int = _f(32, "LoRA scaling alpha")
    dropout: float = _f(0.0, "LoRA dropout (0 keeps log-probs deterministic)")
    target_modules: str = _f("all-linear", "modules that get adapters (PEFT's target_modules)")


@dataclass
class ModelConfig:
    path: str | None = _f(None, "HF hub name, local dir, .gguf file or pkg:PACKAGE/file.gguf; null = the built-in tiny model")
    gguf_file: str | None = _f(None, "a .gguf file inside the model.path folder (de-quantized once, cached)")
    tiny: TinyConfig = _f(TinyConfig, "shape of the built-in tiny model")
    dtype: str = _f("auto", "compute precision: auto = bf16 mixed precision (bf16 matmuls, fp32 weights, "
                    "log-probs and loss) where the hardware does bf16 (CUDA, AMX/AVX512-BF16 CPUs), else "
                    "fp32; bfloat16 | float32 force it (docs/precision.md)")
    trust_remote_code: bool = _f(False, "allow the model repo's own Python code (HF trust_remote_code)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    lora: LoraConfig = _f(LoraConfig, "LoRA adapters")


@dataclass
class WarmstartConfig:
    """Supervised warm start of the built-in tiny model (cached; re-runs skip it)."""

    enabled: bool = _f(True, "supervised warm start of the tiny model before RL")
    steps: int = _f(1000, "warm-start optimizer steps")
    batch_size: int = _f(64, "warm-start examples per step")
    lr: float = _f(1e-3, "warm-start learning rate")
    teacher_accuracy: float = _f(0.35, "fraction of right answers in the teacher data (else off by one)")
    cache_dir: str | None = _f(None, "warm-start cache; null = $RPGRL_CACHE or ~/.cache/rpgrl")


@dataclass
class DataConfig:
    train_files: list[str] = _f([], "verl-format parquet/JSONL training files; empty = the procedural task")
    val_files: list[str] = _f([], "verl-format held-out files (needs train_files)")
    max_prompt_length: int = _f(1024, "prompt tokens kept (see prompt_overlong)")
    prompt_overlong: str = _f("truncate_left", "longer prompts: truncate_left | drop | error")
    on_bad_row: str = _f("error", "a malformed data row: error | skip")
    test_size: int = _f(256, "procedural task: held-out problems")
    task: str = _f("arith", "procedural task: arith ('37+48', tiny model) | arith_chat ('What is 37 + 48? "
                            "Reply as: Answer: <number>', pretrained chat models)")
    operand_min: int = _f(10, "procedural task: smallest operand a, b (the difficulty knob)")
    operand_max: int = _f(99, "procedural task: largest operand a, b")


@dataclass
class RolloutConfig:
    n: int = _f(8, "responses per prompt (the group size G)")
    temperature: float = _f(1.0, "sampling temperature (also divides the logits the loss scores)")
    top_p: float = _f(1.0, "nucleus sampling; < 1 truncates the sampler only (on-policy updates only)")
    max_new_tokens: int = _f(8, "response length limit in tokens")
    generate_batch_sequences: int = _f(256, "sequences per generate() call (memory knob)")
    engine: str = _f("auto", "rpgrl (KV-cached loop) | hf (HF generate) | auto (rpgrl where the cache allows)")
    sampler_logprobs: bool = _f(True, "pi_old's log-probs (and the entropy metric) from the sampler's own logits, "
                                      "no separate pass (rpgrl engine, fp32 compute; equal to round-off)")

    @property
    def batch_size(self) -> int:
        """Deprecated name of :attr:`generate_batch_sequences`."""
        return self.generate_batch_sequences


@dataclass
class AnchorConfig:
    """KL anchor (docs/math.md §1.1): rollout | periodic | adaptive | fixed."""

    mode: str = _f("rollout", "KL anchor (docs/math.md §1.1): rollout | periodic | adaptive | fixed")
    period_optimizer_steps: int = _f(20, "periodic: refresh every K optimizer steps (also mid-batch)")
    kappa: float = _f(0.05, "adaptive: refresh when the KL moving average exceeds kappa")
    ema: float = _f(0.9, "adaptive: moving-average factor of the KL")

    @property
    def period(self) -> int:
        """Deprecated name of :attr:`period_optimizer_steps`."""
        return self.period_optimizer_steps


@dataclass
class DynamicSamplingConfig:
    enabled: bool = _f(False, "DAPO: keep only groups whose scores differ, generating more rounds")
    max_gen_batches: int = _f(4, "most generation rounds per step")


@dataclass
class OverlongConfig:
    enabled: bool = _f(False, "DAPO overlong shaping: penalize responses near max_new_tokens")
    buffer_len: int = _f(4, "tokens before max_new_tokens where the penalty ramps up")
    penalty_factor: float = _f(1.0, "penalty at max_new_tokens")


@dataclass
class AlgorithmConfig:
    preset: str = _f("rpg_reinforce_ufkl", "applied first (before the YAML and overrides): sets the "
                                           "fields below to a named recipe (see PRESETS); each stays overridable")
    loss: str = _f("rpg_reinforce_ufkl", "policy loss (rpgrl.losses.LOSSES)")
    advantage: str = _f("rpg", "advantage estimator (rpgrl.algorithm.advantages.ADVANTAGES)")
    beta: float = _f(1e-4, "KL coefficient of the loss")
    clip_low: float = _f(0.2, "trust region: ratio clipped below 1 - clip_low")
    clip_high: float = _f(0.28, "trust region: ratio clipped above 1 + clip_high")
    dual_clip: float | None = _f(10.0, "dual clip c > 1 for negative advantages; null = off")
    agg: str = _f("token-mean", "loss aggregation (docs/math.md §6)")
    kl_in_advantage: bool = _f(False, "Algorithm 1's KL-in-advantage option (differentiable RPG losses)")
    kl_in_reward: float = _f(0.0, "REINFORCE++: coefficient of the k1 KL folded into the reward")
    anchor: AnchorConfig = _f(AnchorConfig, "KL anchor")
    dynamic_sampling: DynamicSamplingConfig = _f(DynamicSamplingConfig, "DAPO dynamic sampling")
    overlong: OverlongConfig = _f(OverlongConfig, "DAPO overlong reward shaping")

    @property
    def clip_c(self) -> float | None:
        """Deprecated name of :attr:`dual_clip`."""
        return self.dual_clip

    @property
    def name(self) -> str:
        """Deprecated name of :attr:`preset`."""
        return self.preset


@dataclass
class OptimConfig:
    name: str = _f("adamw", "optimizer: adamw | schedulefree_adamw")
    lr: float = _f(2e-4, "learning rate")
    weight_decay: float = _f(0.0, "decoupled weight decay")
    warmup_optimizer_steps: int = _f(0, "linear LR warm-up over this many optimizer steps")
    grad_clip: float = _f(1.0, "global gradient-norm clip")

    @property
    def warmup_steps(self) -> int:
        """Deprecated name of :attr:`warmup_optimizer_steps`."""
        return self.warmup_optimizer_steps


@dataclass
class TrainerConfig:
    total_steps: int = _f(60, "RL steps (one batch of prompts each; every '*_every' counts these)")
    prompts_per_step: int = _f(32, "prompts per RL step (each gets rollout.n responses)")
    mini_batch_prompts: int = _f(8, "prompts per optimizer step (prompts_per_step / this = steps per batch)")
    micro_batch_sequences: int = _f(64, "sequences per forward/backward (memory knob)")
    epochs: int = _f(1, "passes over each batch")
    save_every: int = _f(20, "checkpoint every N RL steps")
    keep_last: int = _f(3, "checkpoints kept")
    eval_every: int = _f(10, "held-out evaluation every N RL steps; 0 = only before/after")
    max_consecutive_skips: int = _f(5, "stop after this many non-finite optimizer steps in a row")
    device: str = _f("auto", "auto | cpu | cuda")
    num_threads: int | None = _f(None, "CPU threads; null = torch's default")
    logprob_chunk_size: int = _f(1024, "tokens per log-softmax chunk (memory knob)")
    profile: bool = _f(False, "measure the fp32 and bf16 matmul peaks at start-up (seconds), then log model FLOP "
                                 "utilisation per phase and print the step-time breakdown at the end")
    fsdp: bool = _f(False, "under torchrun: shard the policy with FSDP2 instead of replicating it")
    share_prompts: bool = _f(True, "forwards run each distinct prompt once and reuse its KV (exact)")
    keep_freed_memory: bool = _f(True, "CPU runs on Linux: glibc keeps freed memory for reuse instead of "
                                       "unmapping it (fewer page faults; rpgrl.loop.host_memory)")

    @property
    def mini_batch_size(self) -> int:
        """Deprecated name of :attr:`mini_batch_prompts`."""
        return self.mini_batch_prompts

    @property
    def micro_batch_size(self) -> int:
        """Deprecated name of :attr:`micro_batch_sequences`."""
        return self.micro_batch_sequences


@dataclass
class EvalConfig:
    k: int = _f(1, "samples per problem (mean@k, pass@k)")
    temperature: float = _f(0.0, "0 = greedy")
    max_problems: int | None = _f(None, "held-out problems evaluated; null = all")
    max_new_tokens: int | None = _f(None, "response length limit; null = rollout.max_new_tokens")
    before_training: bool = _f(True, "evaluate before the first RL step")


@dataclass
class LoggingConfig:
    tensorboard: bool = _f(True, "write TensorBoard events under output_dir")
    wandb: bool = _f(False, "log to Weights & Biases")
    wandb_project: str = _f("rpgrl", "W&B project")
    run_name: str | None = _f(None, "W&B / TensorBoard run name")
    progress: bool = _f(True, "show a progress bar (a plain line at most every progress_every_s "
                               "seconds when stderr is not a terminal)")
    progress_every_s: float = _f(30.0, "without a terminal (CI, cluster logs, | tee): seconds between "
                                       "progress lines (the last step always gets one)")


@dataclass
class Config:
    output_dir: str = _f("runs/default", "where metrics, checkpoints, final/ and summary.json go")
    seed: int = _f(0, "seed of the prompt order, sampling and initialisation")
    reward_fn: str | None = _f(None, '"module:function" with verl\'s compute_score signature; null = built-in')
    reward_timeout_s: float = _f(10.0, "seconds per scored response")
    model: ModelConfig = _f(ModelConfig, "policy model")
    warmstart: WarmstartConfig = _f(WarmstartConfig, "warm start of the tiny model")
    data: DataConfig = _f(DataConfig, "training and held-out data")
    rollout: RolloutConfig = _f(RolloutConfig, "sampling of responses")
    algorithm: AlgorithmConfig = _f(AlgorithmConfig, "loss, advantages, anchor, DAPO techniques")
    optim: OptimConfig = _f(OptimConfig, "optimizer")
    trainer: TrainerConfig = _f(TrainerConfig, "batch sizes, steps, checkpoints")
    eval: EvalConfig = _f(EvalConfig, "held-out evaluation")
    logging: LoggingConfig = _f(LoggingConfig, "metrics sinks")


#: Old dotted names -> current ones; the old still work, with a FutureWarning.
DEPRECATED: dict[str, str] = {
    "trainer.mini_batch_size": "trainer.mini_batch_prompts",
    "trainer.micro_batch_size": "trainer.micro_batch_sequences",
    "algorithm.clip_c": "algorithm.dual_clip",
    "algorithm.name": "algorithm.preset",
    "algorithm.anchor.period": "algorithm.anchor.period_optimizer_steps",
    "rollout.batch_size": "rollout.generate_batch_sequences",
    "optim.warmup_steps": "optim.warmup_optimizer_steps",
}
#: Keys whose old "0 = default / all" spelling still works (as null), with a FutureWarning.
ZERO_MEANS_NULL = ("trainer.num_threads", "eval.max_problems", "eval.max_new_tokens")


# --------------------------------------------------------------------------- presets

_RPG = dict(advantage="rpg", beta=1e-4, clip_low=0.2, clip_high=0.28, dual_clip=10.0,
            kl_in_reward=0.0, dynamic_sampling={"enabled": False})
#: One word sets the paper's hyperparameters (docs/math.md §5 and §7); any field stays overridable.
PRESETS: dict[str, dict[str, Any]] = {
    "grpo": dict(loss="grpo", advantage="grpo", beta=1e-3, clip_low=0.2, clip_high=0.2,
                 dual_clip=None, kl_in_reward=0.0, anchor={"mode": "fixed"},
                 dynamic_sampling={"enabled": False}, overlong={"enabled": False}),
    "grpo_corrected": dict(loss="grpo_corrected", advantage="grpo", beta=1e-3, clip_low=0.2,
                           clip_high=0.2, dual_clip=None, kl_in_reward=0.0, anchor={"mode": "fixed"},
                           dynamic_sampling={"enabled": False}),
    "dapo": dict(loss="ppo", advantage="grpo", beta=0.0, clip_low=0.2, clip_high=0.28,
                 dual_clip=10.0, kl_in_reward=0.0, dynamic_sampling={"enabled": True},
                 overlong={"enabled": True}),
    "reinforce_pp": dict(loss="ppo", advantage="reinforce_pp", beta=0.0, clip_low=0.2,
                         clip_high=0.2, dual_clip=None, kl_in_reward=1e-3, anchor={"mode": "fixed"},
                         dynamic_sampling={"enabled": False}),
    "reinforce_pp_baseline": dict(loss="grpo", advantage="reinforce_pp_baseline", beta=1e-3,
                                  clip_low=0.2, clip_high=0.2, dual_clip=None, kl_in_reward=0.0,
                                  anchor={"mode": "fixed"}, dynamic_sampling={"enabled": False}),
    "ppo": dict(loss="ppo", advantage="grpo", beta=0.0, clip_low=0.2, clip_high=0.2, dual_clip=10.0),
}
# The field's other baselines (rpgrl.losses.baselines), as their papers set them.
# Dr. GRPO [arXiv 2503.20783]: PPO clip, A = R - mean_group (no std), no length normalization
# (token sums / sequences; the paper's extra constant 1/L_max only rescales the step).
PRESETS["dr_grpo"] = dict(loss="ppo", advantage="rpg", beta=0.0, clip_low=0.2, clip_high=0.2, dual_clip=None,
                          agg="seq-mean-token-sum", kl_in_reward=0.0, dynamic_sampling={"enabled": False})
# GSPO [arXiv 2507.18071]: sequence-level ratio, clip (3e-4, 4e-4), sequence-mean aggregation.
PRESETS["gspo"] = dict(loss="gspo", advantage="grpo", beta=0.0, clip_low=3e-4, clip_high=4e-4, dual_clip=None,
                       agg="seq-mean-token-mean", kl_in_reward=0.0, dynamic_sampling={"enabled": False})
# CISPO [arXiv 2506.13585]: truncated IS weight, token-mean; the paper sets no lower bound
# (1 - clip_low = 0.01 here, as config needs clip_low < 1) and ScaleRL's eps_max = 5 above.
PRESETS["cispo"] = dict(loss="cispo", advantage="grpo", beta=0.0, clip_low=0.99, clip_high=4.0, dual_clip=None,
                        agg="token-mean", kl_in_reward=0.0, dynamic_sampling={"enabled": False})
for _kl in ("fkl", "rkl", "ufkl", "urkl"):
    PRESETS[f"rpg_{_kl}"] = dict(_RPG, loss=f"rpg_{_kl}")
    PRESETS[f"rpg_reinforce_{_kl}"] = dict(_RPG, loss=f"rpg_reinforce_{_kl}")

def choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of the enumerated keys, from the modules that define them.
    (``algorithm.loss`` is resolved by the loss registry instead: it also takes plugins.)"""
    from rpgrl.algorithm.advantages import ADVANTAGES
    from rpgrl.algorithm.anchor import ANCHOR_MODES
    from rpgrl.data.procedural import TASKS
    from rpgrl.losses import AGG_MODES
    from rpgrl.loop.optim import OPTIMIZERS
    from rpgrl.loop.generation import ENGINES

    return {
        "model.dtype": ("auto", "float32", "bfloat16"),
        "data.prompt_overlong": ("truncate_left", "drop", "error"),
        "data.on_bad_row": ("error", "skip"),
        "data.task": tuple(TASKS),
        "algorithm.preset": tuple(PRESETS),
        "algorithm.advantage": tuple(ADVANTAGES),
        "algorithm.agg": tuple(AGG_MODES),
        "algorithm.anchor.mode": tuple(ANCHOR_MODES),
        "optim.name": tuple(OPTIMIZERS),
        "trainer.device": ("auto", "cpu", "cuda"),
        "rollout.engine": tuple(ENGINES),
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
        if full in DEPRECATED:
            new = DEPRECATED[full]
            key = new.rsplit(".", 1)[1]
            if key in updates:
                raise ConfigError(f"{full} and {new} are the same key (the first is its deprecated name); set only {new}")
            warnings.warn(f"config key {full} is deprecated; use {new}", FutureWarning, stacklevel=2)
            full = new
        if full in ZERO_MEANS_NULL and value == 0 and not isinstance(value, bool):
            warnings.warn(f"{full}=0 is deprecated; use null (the default)", FutureWarning, stacklevel=2)
            value = None
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
    """defaults -> preset named by ``algorithm.preset`` -> YAML -> overrides, then validate."""
    raw = read_yaml(path) if path is not None else {}
    raw = _merge(raw, parse_overrides(overrides or []))
    cfg = Config()
    algo = raw.get("algorithm") or {}
    name = algo.get("preset", algo.get("name", cfg.algorithm.preset))  # "name": its deprecated spelling
    if name not in PRESETS:
        raise ConfigError(f"algorithm.preset: unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
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
    for key, allowed in choices().items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key}: {_get(cfg, key)!r} is not one of {', '.join(allowed)}")
    from rpgrl.losses import LOSSES
    from rpgrl.losses.policy import hyperparameter_problems

    a, t, r = cfg.algorithm, cfg.trainer, cfg.rollout
    try:  # built-in, rpgrl.losses entry point or module:function (rpgrl.losses.registry)
        LOSSES.resolve(a.loss)
    except ValueError as exc:
        raise ConfigError(f"algorithm.loss: {exc}") from None
    # the loss hyperparameters' ranges are stated once, in rpgrl.losses.policy
    for param, problem in hyperparameter_problems(a.beta, (a.clip_low, a.clip_high), a.dual_clip, a.agg):
        raise ConfigError(f"algorithm.{param}: {problem}")
    checks = [
        ("algorithm.kl_in_reward", a.kl_in_reward >= 0, "must be >= 0"),
        ("algorithm.anchor.period_optimizer_steps", a.anchor.period_optimizer_steps >= 1, "must be >= 1"),
        ("algorithm.anchor.kappa", a.anchor.kappa > 0, "must be > 0"),
        ("algorithm.anchor.ema", 0 <= a.anchor.ema < 1, "must be in [0, 1)"),
        ("algorithm.dynamic_sampling.max_gen_batches", a.dynamic_sampling.max_gen_batches >= 1, "must be >= 1"),
        ("algorithm.overlong.buffer_len", a.overlong.buffer_len >= 1, "must be >= 1"),
        ("rollout.n", r.n >= 1, "must be >= 1"),
        ("rollout.temperature", r.temperature > 0, "must be > 0"),
        ("rollout.top_p", 0 < r.top_p <= 1, "must be in (0, 1]"),
        ("rollout.max_new_tokens", r.max_new_tokens >= 1, "must be >= 1"),
        ("rollout.generate_batch_sequences", r.generate_batch_sequences >= 1, "must be >= 1"),
        ("optim.lr", cfg.optim.lr > 0, "must be > 0"),
        ("optim.weight_decay", cfg.optim.weight_decay >= 0, "must be >= 0"),
        ("optim.warmup_optimizer_steps", cfg.optim.warmup_optimizer_steps >= 0, "must be >= 0"),
        ("optim.grad_clip", cfg.optim.grad_clip > 0, "must be > 0"),
        ("trainer.total_steps", t.total_steps >= 1, "must be >= 1"),
        ("trainer.prompts_per_step", t.prompts_per_step >= 1, "must be >= 1"),
        ("trainer.mini_batch_prompts", t.mini_batch_prompts >= 1, "must be >= 1"),
        ("trainer.micro_batch_sequences", t.micro_batch_sequences >= 1, "must be >= 1"),
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
        ("eval.max_problems", cfg.eval.max_problems is None or cfg.eval.max_problems >= 1, "must be >= 1 or null (all)"),
        ("eval.max_new_tokens", cfg.eval.max_new_tokens is None or cfg.eval.max_new_tokens >= 1,
         "must be >= 1 or null (rollout.max_new_tokens)"),
        ("trainer.num_threads", t.num_threads is None or t.num_threads >= 1, "must be >= 1 or null (torch's default)"),
        ("eval.temperature", cfg.eval.temperature >= 0, "must be >= 0 (0 = greedy)"),
        ("reward_timeout_s", cfg.reward_timeout_s > 0, "must be > 0"),
        ("logging.progress_every_s", cfg.logging.progress_every_s >= 0, "must be >= 0 (0 = a line every step)"),
        ("warmstart.steps", cfg.warmstart.steps >= 0, "must be >= 0"),
        ("warmstart.teacher_accuracy", 0 <= cfg.warmstart.teacher_accuracy <= 1, "must be in [0, 1]"),
    ]
    for key, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"{key}: {_get(cfg, key)!r} {allowed}")
    if t.prompts_per_step % t.mini_batch_prompts:
        raise ConfigError(
            f"trainer.mini_batch_prompts: {t.mini_batch_prompts} must divide trainer.prompts_per_step "
            f"({t.prompts_per_step})"
        )
    seqs = t.mini_batch_prompts * r.n
    if seqs % t.micro_batch_sequences:
        raise ConfigError(
            f"trainer.micro_batch_sequences: {t.micro_batch_sequences} must divide the sequences per "
            f"mini-batch, trainer.mini_batch_prompts * rollout.n = {seqs}"
        )
    if a.kl_in_reward > 0 and a.anchor.mode == "rollout":
        raise ConfigError(
            "algorithm.kl_in_reward: a KL folded into the reward needs a reference; with "
            "algorithm.anchor.mode=rollout it is identically 0. Use anchor.mode=fixed|periodic|adaptive"
        )
    if r.top_p < 1:
        # The sampler draws from the top-p nucleus, pi_old is scored with the full softmax, so
        # any ratio that assumes the samples came from pi_old (w, or v = pi_anc/pi_old) is wrong.
        why = [k for k, on in (
            (f"trainer.epochs={t.epochs}", t.epochs > 1),
            (f"{t.prompts_per_step // t.mini_batch_prompts} mini-batches per batch", t.prompts_per_step // t.mini_batch_prompts > 1),
            ("optim.name=schedulefree_adamw (samples with its averaged iterate)", cfg.optim.name == "schedulefree_adamw"),
            (f"algorithm.anchor.mode={a.anchor.mode} with beta > 0 (v = pi_anc/pi_old)", a.anchor.mode != "rollout" and a.beta > 0),
        ) if on]
        if why:
            raise ConfigError(
                f"rollout.top_p: {r.top_p} < 1 samples from the truncated nucleus, but pi_old is the full "
                f"softmax, so the importance weights of this off-policy setup ({'; '.join(why)}) are not ratios "
                f"to the sampler and the trust region / KL act on the wrong ratio. Set rollout.top_p=1.0, or "
                f"train on-policy: trainer.epochs=1, trainer.mini_batch_prompts=trainer.prompts_per_step, "
                f"optim.name=adamw and algorithm.anchor.mode=rollout (or algorithm.beta=0)"
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


def check_world_size(cfg: Config, world_size: int) -> None:
    """The part of ``validate`` that needs the number of processes (known once torchrun has
    started): fail before any work if the batch cannot be split into whole groups per rank."""
    if world_size <= 1:
        return
    t = cfg.trainer
    for key, value in (("trainer.prompts_per_step", t.prompts_per_step),
                       ("trainer.mini_batch_prompts", t.mini_batch_prompts)):
        if value % world_size:
            raise ConfigError(
                f"{key}: {value} is not divisible by the world size {world_size} (processes over all "
                f"nodes); each process takes whole prompt groups, so use a multiple of {world_size}"
            )


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(obj: Any = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) of every leaf field, in declaration order."""
    obj = Config() if obj is None else obj
    hints = get_type_hints(type(obj))
    rows = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(value, f"{prefix}{f.name}.")
            continue
        typ = getattr(hints[f.name], "__name__", None) if get_origin(hints[f.name]) is None else None
        rows.append((prefix + f.name, typ or str(hints[f.name]).replace("typing.", ""),
                     yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n..."),
                     f.metadata.get("doc", "")))
    return rows


def help_text() -> str:
    """``rpgrl train --help-config``: every key with its type, default and description."""
    rows = describe()
    allowed = choices()
    wk = max(len(r[0]) for r in rows)
    wt = max(len(r[1]) for r in rows)
    wd = max(len(r[2]) for r in rows)
    lines = [f"{'key':<{wk}}  {'type':<{wt}}  {'default':<{wd}}  description"]
    for key, typ, default, doc in rows:
        extra = f" [{', '.join(allowed[key])}]" if key in allowed and key != "algorithm.preset" else ""
        lines.append(f"{key:<{wk}}  {typ:<{wt}}  {default:<{wd}}  {doc}{extra}")
    lines.append("")
    lines.append("algorithm.preset presets: " + ", ".join(PRESETS))
    lines += [f"deprecated: {old} -> {new}" for old, new in DEPRECATED.items()]
    return "\n".join(lines)
