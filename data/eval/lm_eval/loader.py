"""Loads the bundled multiple-choice files (data/eval/*.jsonl) for the lm-evaluation-harness task YAMLs here,
as `custom_dataset` functions: paths are relative to this file, so the tasks run from any working directory."""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name):
    import datasets
    with open(os.path.join(HERE, "..", f"{name}.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def austen_cloze(**kwargs):
    return _load("austen_cloze")


def stdlib_nextline(**kwargs):
    return _load("stdlib_nextline")
