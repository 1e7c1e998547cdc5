"""Supervised warm start of the built-in tiny model, cached on disk.

RL needs a policy that sometimes emits a correct "Answer:N" (a random 1M-parameter model
never does, so every group has zero advantage). A few hundred SFT steps teach the format
and rough arithmetic; RL does the rest. The result is keyed by everything that shapes it,
so re-runs of the default skip straight to RL.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch

from rpgrl.data.procedural import sft_text
from rpgrl.data.verl import Example, tokenize_prompts
from rpgrl.models.tiny import TinyModelConfig, build_tiny_model, build_tiny_tokenizer

_VERSION = 1


def cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    return Path(os.environ.get("RPGRL_CACHE", Path.home() / ".cache" / "rpgrl"))


def _sft_batch(tokenizer, prompt_ids: list[list[int]], examples: list[Example], teacher_accuracy: float = 1.0,
               rng: random.Random | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+answer ids with labels only on the answer (and its EOS)."""
    rows, labels = [], []
    for p_ids, ex in zip(prompt_ids, examples):
        answer = sft_text(ex, teacher_accuracy, rng)
        a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p_ids + a_ids)
        labels.append([-100] * len(p_ids) + a_ids)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lab_row) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lab_row)] = torch.tensor(lab_row)
        mask[i, : len(r)] = 1
    return ids, mask, lab


def warm_start_tiny(
    train: list[Example], *, tiny: TinyModelConfig, steps: int, batch_size: int, lr: float,
    seed: int, teacher_accuracy: float = 1.0, cache_dir: str | None = None, log=print,
) -> Path:
    """Return a ``save_pretrained`` directory holding the warm-started tiny model."""
    key = json.dumps(
        {"v": _VERSION, "tiny": tiny.__dict__, "steps": steps, "bs": batch_size, "lr": lr,
         "seed": seed, "teacher": teacher_accuracy, "n_train": len(train), "first": train[0].uid if train else None},
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    out = cache_root(cache_dir) / "warmstart" / digest
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        log(f"warm start: reusing cached tiny model {out}")
        return out
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, tiny, seed=seed)
    if steps:
        log(f"warm start: {steps} supervised steps on the procedural task (cached afterwards)")
        rng = random.Random(seed)
        prompts, _, _ = tokenize_prompts(train, tokenizer, max_prompt_length=1 << 30, overlong="error")
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        model.train()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for _ in range(steps):
                picked = rng.sample(range(len(train)), min(batch_size, len(train)))
                ids, mask, lab = _sft_batch(tokenizer, [prompts[i] for i in picked],
                                            [train[i] for i in picked], teacher_accuracy, rng)
                loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
        log(f"warm start: final SFT loss {loss.item():.3f}")
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    try:
        os.replace(tmp, out)  # atomic: a reader sees no folder or a complete one
    except OSError:
        # another process renamed its copy first (a rename onto a non-empty folder fails);
        # theirs is as good as ours. Anything else (no permission, disk full) is re-raised.
        if not (out / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out
