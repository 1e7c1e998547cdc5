"""verl parquet / JSONL loading, row validation, uid of repeats, prompt tokenisation."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rpgrl.data.verl import DataError, Example, load_examples, tokenize_prompts

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def good_row(i: int = 0, problem: str = "1+1", gt: str = "2") -> dict:
    return {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": f"Solve {problem}"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": gt, "style": "rule"},
        "extra_info": {"index": i, "raw_problem": problem, "split": "train"},
    }


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_and_parquet_round_trip(tmp_path) -> None:
    rows = [good_row(0, "1+1", "2"), good_row(1, "2+2", "4"), good_row(0, "1+1", "2")]
    j = write_jsonl(tmp_path / "d.jsonl", rows)
    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    for path in (j, p):
        examples, stats = load_examples([path])
        assert stats == {"rows": 3, "loaded": 3, "skipped": 0, "errors": [], "problems": 2,
                         "by_data_source": {"math_dapo": 3}}
        e = examples[1]
        assert isinstance(e, Example)
        assert e.messages == [{"role": "user", "content": "Solve 2+2"}]
        assert e.ground_truth == "4" and e.data_source == "math_dapo"
        assert e.extra_info["raw_problem"] == "2+2"
        assert examples[0].uid == examples[2].uid != examples[1].uid
    both, stats = load_examples([j, p])
    assert stats["loaded"] == 6 and stats["problems"] == 2


def test_optional_fields_and_integer_ground_truth(tmp_path) -> None:
    row = good_row()
    del row["ability"], row["extra_info"]
    row["reward_model"] = {"ground_truth": 7}
    (ex,), _ = load_examples([write_jsonl(tmp_path / "d.jsonl", [row])])
    assert ex.ground_truth == "7" and ex.extra_info == {}


def _with(**changes):
    row = good_row()
    for key, value in changes.items():
        if value is _DEL:
            del row[key]
        else:
            row[key] = value
    return row


_DEL = object()

# (row, expected message fragments after "<file>: row 1")
BAD_ROWS = [
    (_with(data_source=_DEL), "missing field 'data_source'"),
    (_with(data_source=""), "field 'data_source': expected a non-empty string"),
    (_with(data_source=3), "field 'data_source': expected a non-empty string, got 3"),
    (_with(prompt=_DEL), "missing field 'prompt'"),
    (_with(prompt="Solve 1+1"), "field 'prompt': expected a list of {role, content} messages"),
    (_with(prompt=[]), "field 'prompt': expected a non-empty list"),
    (_with(prompt=["hi"]), "field 'prompt[0]': expected a {role, content} message object"),
    (_with(prompt=[{"role": "user"}]), "field 'prompt[0].content': expected a string, got None"),
    (_with(prompt=[{"role": "", "content": "x"}]),
     "field 'prompt[0].role': expected a non-empty string"),
    (_with(prompt=[{"role": "user", "content": "  "}]),
     "field 'prompt': expected at least one message with non-empty content"),
    (_with(reward_model=_DEL), "missing field 'reward_model'"),
    (_with(reward_model="2"), "field 'reward_model': expected an object {ground_truth, style}"),
    (_with(reward_model={"style": "rule"}), "missing field 'reward_model.ground_truth'"),
    (_with(reward_model={"ground_truth": None}),
     "field 'reward_model.ground_truth': expected a non-empty string, got None"),
    (_with(reward_model={"ground_truth": ""}), "field 'reward_model.ground_truth': expected a non-empty string"),
    (_with(reward_model={"ground_truth": ["2"]}), "field 'reward_model.ground_truth': expected a non-empty string"),
    (_with(extra_info=[1, 2]), "field 'extra_info': expected an object"),
    (_with(ability=5), "field 'ability': expected a string"),
    ([1, 2, 3], "field '<row>': expected an object"),
    ("{not json", "invalid JSON"),
]


@pytest.mark.parametrize("row,fragment", BAD_ROWS, ids=[f[1][:40] for f in BAD_ROWS])
def test_bad_jsonl_rows_name_file_row_and_field(tmp_path, row, fragment) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [good_row(), row, good_row(2)])
    with pytest.raises(DataError) as ei:
        load_examples([path])
    msg = str(ei.value)
    assert msg.startswith(f"{path}: row 1 (line 2)"), msg
    assert fragment in msg, msg
    examples, stats = load_examples([path], on_bad_row="skip")
    assert len(examples) == 2 and stats["skipped"] == 1 and stats["rows"] == 3
    assert fragment in stats["errors"][0]


# Malformations a parquet file can hold (one schema per file: wrong values are nulls/empties).
BAD_PARQUET = [
    ({"data_source": None}, "field 'data_source': expected a non-empty string, got None"),
    ({"data_source": " "}, "field 'data_source': expected a non-empty string, got ' '"),
    ({"prompt": None}, "field 'prompt': expected a list of {role, content} messages, got None"),
    ({"prompt": []}, "field 'prompt': expected a non-empty list"),
    ({"prompt": [{"role": "user", "content": None}]}, "field 'prompt[0].content': expected a string, got None"),
    ({"reward_model": None}, "field 'reward_model': expected an object {ground_truth, style}, got None"),
    ({"reward_model": {"ground_truth": None, "style": "rule"}},
     "field 'reward_model.ground_truth': expected a non-empty string, got None"),
    ({"reward_model": {"ground_truth": "", "style": "rule"}},
     "field 'reward_model.ground_truth': expected a non-empty string, got ''"),
]


@pytest.mark.parametrize("change,fragment", BAD_PARQUET, ids=[f[1][:40] for f in BAD_PARQUET])
def test_bad_parquet_rows_name_file_row_and_field(tmp_path, change, fragment) -> None:
    path = tmp_path / "bad.parquet"
    rows = [good_row(0), {**good_row(1), **change}, good_row(2)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError) as ei:
        load_examples([path])
    assert str(ei.value).startswith(f"{path}: row 1: {fragment}"), str(ei.value)
    examples, stats = load_examples([path], on_bad_row="skip")
    assert [e.extra_info["index"] for e in examples] == [0, 2] and stats["skipped"] == 1


def test_parquet_missing_column(tmp_path) -> None:
    rows = [good_row(0), good_row(1)]
    for r in rows:
        del r["reward_model"]
    path = tmp_path / "nogt.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"nogt\.parquet: row 0: missing field 'reward_model'"):
        load_examples([path])
    with pytest.raises(DataError, match=r"no valid rows .* \(2 rows read\)"):
        load_examples([path], on_bad_row="skip")


def test_bad_files(tmp_path) -> None:
    with pytest.raises(DataError, match="missing.parquet: no such file"):
        load_examples([tmp_path / "missing.parquet"])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x\.csv: unsupported file type '\.csv'"):
        load_examples([tmp_path / "x.csv"])
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable parquet file"):
        load_examples([tmp_path / "junk.parquet"])
    with pytest.raises(ValueError, match="on_bad_row"):
        load_examples([tmp_path / "x.csv"], on_bad_row="ignore")


@pytest.mark.skipif(not (DATA / "aime25.parquet").is_file(), reason="shared data absent")
def test_shared_mean_at_32_repeats_share_a_uid() -> None:
    # In aime25, extra_info.index numbers the repeat, not the problem: uid must not use it.
    examples, stats = load_examples([DATA / "aime25.parquet"])
    assert stats["problems"] == 30
    by_uid: dict[str, list] = {}
    for e in examples:
        by_uid.setdefault(e.uid, []).append(e)
    assert sorted({len(v) for v in by_uid.values()}) == [32]
    for v in by_uid.values():
        assert len({e.extra_info["raw_problem"] for e in v}) == 1
        assert len({e.ground_truth for e in v}) == 1


# ---- tokenisation with a real, locally built tokenizer ------------------------------

@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 +=:?.,<>/\n"))
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(chars)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    # A post-processor that prepends BOS: encoding the templated text with special tokens
    # would then give two BOS tokens.
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    t.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                       "{% endfor %}{% if add_generation_prompt %}<a>{% endif %}")
    return t


def _ex(content: str) -> Example:
    return Example(messages=[{"role": "user", "content": content}], ground_truth="1",
                   data_source="t", extra_info={}, uid=f"t/{content}")


def test_tokenize_prompts_applies_template_once(tokenizer) -> None:
    ids, kept, stats = tokenize_prompts([_ex("1+2")], tokenizer, max_prompt_length=100)
    text = "<bos><user>1+2\n<a>"
    assert tokenizer.decode(ids[0]).replace(" ", "") == text.replace(" ", "")
    assert ids[0].count(1) == 1 and ids[0][0] == 1                      # exactly one BOS
    assert len(ids[0]) == 1 + len("<user>1+2\n<a>")
    assert kept == [0] and stats["truncated"] == stats["dropped"] == 0


def test_tokenize_prompts_overlong_modes(tokenizer) -> None:
    exs = [_ex("1+2"), _ex("1234567890" * 3), _ex("9")]
    full, _, _ = tokenize_prompts(exs, tokenizer, 1000)
    limit = len(full[0])  # the short prompts fit exactly, the long one does not
    ids, kept, stats = tokenize_prompts(exs, tokenizer, limit, overlong="truncate_left")
    assert kept == [0, 1, 2] and stats["truncated"] == 1 and stats["dropped"] == 0
    assert ids[1] == full[1][-limit:] and ids[0] == full[0]             # left truncation
    ids, kept, stats = tokenize_prompts(exs, tokenizer, limit, overlong="drop")
    assert kept == [0, 2] and stats["dropped"] == 1 and ids == [full[0], full[2]]
    msg = rf"prompt 1 \(uid t/1234567890.*\) has {len(full[1])} tokens > max_prompt_length={limit}"
    with pytest.raises(DataError, match=msg):
        tokenize_prompts(exs, tokenizer, limit, overlong="error")
