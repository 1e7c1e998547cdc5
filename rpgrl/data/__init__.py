"""Prompts for training and evaluation: verl-format parquet/JSONL files, or the procedural task."""

from rpgrl.data.procedural import DATA_SOURCE as PROCEDURAL_SOURCE
from rpgrl.data.procedural import addition_splits
from rpgrl.data.verl import DataError, Example, load_examples, tokenize_prompts

__all__ = ["DataError", "Example", "PROCEDURAL_SOURCE", "addition_splits", "load_examples",
           "tokenize_prompts"]
