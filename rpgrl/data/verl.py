"""verl-format prompt data: parquet / JSONL loading, validation and prompt tokenisation
(docs/math.md §9).

Each row holds ``data_source`` (str), ``prompt`` (list of ``{role, content}``),
``ability`` (str, optional), ``reward_model`` (``{ground_truth, style}``) and
``extra_info`` (``{index, raw_problem, split}``, optional). Mean@k files repeat each
problem k times, and ``extra_info.index`` is *not* a problem id in every file (in the
shipped AIME25 / AMC23 files it numbers the repeat), so a problem's ``uid`` is a hash of
its data_source and prompt messages: equal for repeats, distinct across problems.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Sequence

__all__ = ["Example", "DataError", "load_examples", "validate_row", "problem_uid", "tokenize_prompts"]

log = logging.getLogger(__name__)

_MAX_ERRORS_KEPT = 20


class DataError(ValueError):
    """A data file or row that does not match the verl format; the message says where."""


@dataclass
class Example:
    """One prompt: chat messages, the answer to check against, where it came from."""

    messages: list[dict]
    ground_truth: str
    data_source: str
    extra_info: dict = field(default_factory=dict)
    uid: str = ""


def problem_uid(data_source: str, messages: list[dict]) -> str:
    """Stable id of a distinct problem: equal for the k repeats of a Mean@k file."""
    canon = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return f"{data_source}/{hashlib.sha1(canon.encode('utf-8')).hexdigest()[:16]}"


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def validate_row(row: Any, where: str) -> Example:
    """Check one row and build its Example; raise DataError naming ``where`` and the field."""

    def bad(fieldname: str, expected: str, got: Any) -> DataError:
        shown = repr(got) if not isinstance(got, (dict, list)) or len(repr(got)) < 80 else _type_name(got)
        return DataError(f"{where}: field '{fieldname}': expected {expected}, got {shown}")

    if not isinstance(row, dict):
        raise bad("<row>", "an object with keys data_source, prompt, reward_model", row)
    ds = row.get("data_source")
    if "data_source" not in row:
        raise DataError(f"{where}: missing field 'data_source' (expected a non-empty string)")
    if not isinstance(ds, str) or not ds.strip():
        raise bad("data_source", "a non-empty string", ds)

    if "prompt" not in row:
        raise DataError(f"{where}: missing field 'prompt' (expected a list of {{role, content}} messages)")
    prompt = row["prompt"]
    if hasattr(prompt, "tolist"):  # numpy arrays from pandas-written files
        prompt = prompt.tolist()
    if not isinstance(prompt, list):
        raise bad("prompt", "a list of {role, content} messages", prompt)
    if not prompt:
        raise bad("prompt", "a non-empty list of {role, content} messages", prompt)
    messages = []
    for j, m in enumerate(prompt):
        if not isinstance(m, dict):
            raise bad(f"prompt[{j}]", "a {role, content} message object", m)
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise bad(f"prompt[{j}].{key}", "a string", m.get(key))
        if not m["role"].strip():
            raise bad(f"prompt[{j}].role", "a non-empty string such as 'user'", m["role"])
        messages.append({"role": m["role"], "content": m["content"]})
    if not any(m["content"].strip() for m in messages):
        raise bad("prompt", "at least one message with non-empty content", prompt)

    if "reward_model" not in row:
        raise DataError(f"{where}: missing field 'reward_model' (expected {{ground_truth, style}})")
    rm = row["reward_model"]
    if not isinstance(rm, dict):
        raise bad("reward_model", "an object {ground_truth, style}", rm)
    if "ground_truth" not in rm:
        raise DataError(f"{where}: missing field 'reward_model.ground_truth' (expected a non-empty string)")
    gt = rm["ground_truth"]
    if isinstance(gt, int) and not isinstance(gt, bool):
        gt = str(gt)
    if not isinstance(gt, str) or not gt.strip():
        raise bad("reward_model.ground_truth", "a non-empty string", gt)

    ability = row.get("ability")
    if ability is not None and not isinstance(ability, str):
        raise bad("ability", "a string", ability)
    extra = row.get("extra_info")
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise bad("extra_info", "an object {index, raw_problem, split}", extra)
    extra = dict(extra)
    return Example(messages=messages, ground_truth=gt.strip(), data_source=ds, extra_info=extra,
                   uid=problem_uid(ds, messages))


def _read_rows(path: Path) -> list[tuple[str, Any]]:
    """(location, row) pairs of one file; unreadable files raise DataError."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:
            raise DataError(f"{path}: not a readable parquet file: {exc}") from exc
        return [(f"{path}: row {i}", r) for i, r in enumerate(rows)]
    if suffix in (".jsonl", ".json"):
        out = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}: row {len(out)} (line {lineno})"
                try:
                    out.append((where, json.loads(line)))
                except json.JSONDecodeError as exc:
                    out.append((where, DataError(f"{where}: invalid JSON: {exc.msg} at column {exc.colno}")))
        return out
    raise DataError(f"{path}: unsupported file type {suffix!r} (expected .parquet or .jsonl)")


def load_examples(paths: Sequence[str | Path], *, on_bad_row: str = "error") -> tuple[list[Example], dict]:
    """Load and validate verl rows from parquet / JSONL files.

    ``on_bad_row="error"`` raises DataError at the first malformed row (its message names
    file, row and field); ``"skip"`` drops it and counts it. Returns
    ``(examples, stats)`` with stats ``rows``, ``loaded``, ``skipped``, ``errors`` (the
    first messages), ``problems`` (distinct uids) and ``by_data_source``.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"load_examples: on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise DataError("load_examples: no data files given")
    examples: list[Example] = []
    stats: dict[str, Any] = {"rows": 0, "loaded": 0, "skipped": 0, "errors": []}
    for p in paths:
        path = Path(p).expanduser()
        for where, row in _read_rows(path):
            stats["rows"] += 1
            try:
                if isinstance(row, DataError):
                    raise row
                examples.append(validate_row(row, where))
            except DataError as exc:
                if on_bad_row == "error":
                    raise
                stats["skipped"] += 1
                if len(stats["errors"]) < _MAX_ERRORS_KEPT:
                    stats["errors"].append(str(exc))
    if stats["skipped"]:
        log.warning("skipped %d malformed rows of %d; first: %s", stats["skipped"], stats["rows"],
                    stats["errors"][0])
    if not examples:
        raise DataError(f"no valid rows in {[str(p) for p in paths]} ({stats['rows']} rows read)")
    stats["loaded"] = len(examples)
    stats["problems"] = len({e.uid for e in examples})
    stats["by_data_source"] = dict(Counter(e.data_source for e in examples))
    return examples, stats


def _render(messages: list[dict], tokenizer) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # Base models without a template: the bare contents, so prompts still reach the model.
    return "\n".join(m["content"] for m in messages)


def tokenize_prompts(examples: Sequence[Example], tokenizer, max_prompt_length: int,
                     overlong: str = "truncate_left") -> tuple[list[list[int]], list[int], dict]:
    """Chat-template and encode prompts, enforcing ``max_prompt_length`` tokens.

    The template already inserts BOS / role tokens, so encoding uses
    ``add_special_tokens=False`` (else BOS would appear twice). Overlong prompts are
    left-truncated (the question's end and the generation prompt survive), dropped, or
    rejected (``overlong`` = ``truncate_left`` / ``drop`` / ``error``). Returns
    ``(token_ids, kept_indices, stats)`` with stats ``truncated``, ``dropped``,
    ``max_len``, ``mean_len`` (after truncation).
    """
    if overlong not in ("truncate_left", "drop", "error"):
        raise ValueError(f"tokenize_prompts: overlong must be 'truncate_left', 'drop' or 'error', got {overlong!r}")
    if max_prompt_length <= 0:
        raise ValueError(f"tokenize_prompts: max_prompt_length must be > 0, got {max_prompt_length}")
    if not getattr(tokenizer, "chat_template", None):
        log.warning("tokenizer has no chat_template: prompts are the raw message contents")
    ids_out: list[list[int]] = []
    kept: list[int] = []
    truncated = dropped = 0
    for i, ex in enumerate(examples):
        ids = list(tokenizer(_render(ex.messages, tokenizer), add_special_tokens=False)["input_ids"])
        if len(ids) > max_prompt_length:
            if overlong == "error":
                raise DataError(f"prompt {i} (uid {ex.uid}) has {len(ids)} tokens > max_prompt_length="
                                f"{max_prompt_length}; raise the limit or use overlong='drop'/'truncate_left'")
            if overlong == "drop":
                dropped += 1
                continue
            ids = ids[-max_prompt_length:]
            truncated += 1
        ids_out.append(ids)
        kept.append(i)
    lens = [len(x) for x in ids_out]
    stats = {"truncated": truncated, "dropped": dropped, "max_len": max(lens, default=0),
             "mean_len": sum(lens) / len(lens) if lens else 0.0}
    return ids_out, kept, stats
