"""Build what a run needs from its config: examples, tokenized prompts, scorer, policy.

Order matters and lives here only: examples first (the tiny model's warm start trains on
them), then the model path (given, or the cached warm start), then the tokenizer and the
prompts, then the policy on its device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rpgrl.config import Config
from rpgrl.data.procedural import addition_splits
from rpgrl.data.verl import Example, load_examples, tokenize_prompts
from rpgrl.models.loading import Precision, load_model, resolve_device, resolve_precision
from rpgrl.rewards import load_scorer
from rpgrl.models.tiny import TinyModelConfig
from rpgrl.models.warmstart import warm_start_tiny


@dataclass
class RunData:
    train: list[Example]
    train_prompts: list[list[int]]
    test: list[Example]
    test_prompts: list[list[int]]
    scorer: Callable | None  # None = rpgrl.rewards.compute_score
    model_path: str
    precision: Precision  # fp32 weights; fp32 or bf16-mixed compute (docs/precision.md)


def _examples(cfg: Config, log) -> tuple[list[Example], list[Example]]:
    d = cfg.data
    if not d.train_files:
        train, test = addition_splits(d.operand_min, d.operand_max, test_size=d.test_size, task=d.task)
        what = "2-digit addition" if (d.task, d.operand_min, d.operand_max) == ("arith", 10, 99) else \
            f"addition a + b, a and b in {d.operand_min}..{d.operand_max} ({d.task})"
        log(f"data: procedural {what}, {len(train)} train / {len(test)} held-out problems")
        return train, test
    train, stats = load_examples(d.train_files, on_bad_row=d.on_bad_row)
    log(f"data: {len(train)} train rows from {len(d.train_files)} file(s) {stats}")
    test: list[Example] = []
    if d.val_files:
        test, vstats = load_examples(d.val_files, on_bad_row=d.on_bad_row)
        log(f"data: {len(test)} validation rows {vstats}")
    return train, test


def _tokenize(examples: list[Example], tokenizer, cfg: Config, what: str, log):
    if not examples:
        return [], []
    ids, kept, stats = tokenize_prompts(
        examples, tokenizer, cfg.data.max_prompt_length, overlong=cfg.data.prompt_overlong
    )
    if stats.get("truncated") or stats.get("dropped"):
        log(f"data: {what} prompts over data.max_prompt_length={cfg.data.max_prompt_length}: {stats}")
    if not kept:
        raise ValueError(f"data: every {what} prompt was dropped by data.max_prompt_length="
                         f"{cfg.data.max_prompt_length}")
    return [examples[i] for i in kept], ids


def setup_run(cfg: Config, log=print) -> tuple[RunData, torch.nn.Module, object, torch.device]:
    device = resolve_device(cfg.trainer.device)
    precision = resolve_precision(cfg.model.dtype, device)
    log(precision.describe())
    train, test = _examples(cfg, log)
    scorer = load_scorer(cfg.reward_fn) if cfg.reward_fn else None
    path = cfg.model.path
    if path is None:  # the built-in tiny model, warm-started once (cached)
        ws, t = cfg.warmstart, cfg.model.tiny
        tiny = TinyModelConfig(t.hidden_size, t.num_layers, t.num_heads, t.intermediate_size)
        path = str(warm_start_tiny(
            train, tiny=tiny, steps=ws.steps if ws.enabled else 0, batch_size=ws.batch_size,
            lr=ws.lr, seed=cfg.seed, teacher_accuracy=ws.teacher_accuracy, cache_dir=ws.cache_dir, log=log,
        ))
    m = cfg.model
    model, tokenizer, path = load_model(
        path, device=device, precision=precision, gguf_file=m.gguf_file, cache_dir=cfg.warmstart.cache_dir,
        trust_remote_code=m.trust_remote_code, gradient_checkpointing=m.gradient_checkpointing, lora=m.lora, log=log,
    )
    train, train_prompts = _tokenize(train, tokenizer, cfg, "train", log)
    test, test_prompts = _tokenize(test, tokenizer, cfg, "held-out", log)
    data = RunData(train, train_prompts, test, test_prompts, scorer, path, precision)
    return data, model, tokenizer, device
