"""Loads the offline tasks' jsonl files (beside this file) as lm-eval datasets, with no download."""

import json
import os

import datasets

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str) -> datasets.DatasetDict:
  with open(os.path.join(_HERE, name), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def next_line(**kwargs) -> datasets.DatasetDict:
  del kwargs  # lm-eval passes the task's metadata and dataset_kwargs
  return _load("rg_stdlib_next_line.jsonl")


def complete(**kwargs) -> datasets.DatasetDict:
  del kwargs
  return _load("rg_stdlib_complete.jsonl")


def ppl(**kwargs) -> datasets.DatasetDict:
  del kwargs
  return _load("rg_stdlib_ppl.jsonl")
