"""The miniature Ettin study's evaluation protocol (issue 26): its tasks, their checks, per-item scores, comparisons.

Tasks (files in data/eval/study/, built by data/eval/build_study.py; sizes and splits in data/eval/README.md) come in
the paper's three families: classification fine-tuning (three sentence-pair / sentence tasks and one token-level
task), retrieval after contrastive fine-tuning, and zero-shot generation / likelihood on held-out text. Every
fine-tuned task runs its LR grid (retrieval: LR x steps) with seed 0, chooses the grid point with the best dev score,
and trains that point with `seeds` seeds in all; an item's test score is the mean over those seeds (the cost is
grid + seeds - 1 runs rather than grid x seeds). Test items are scored per item so that two
models are compared on the same items (`stats.paired_bootstrap`, and `stats.mcnemar` for 0/1 scores).

Results of every (model, task, grid point, seed) run are cached as they finish (`Cache`), so an interrupted study
resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional

import numpy as np

from ettin_jax.evaluation import classification, likelihood, metrics, retrieval, stats, tagging
from ettin_jax.evaluation.models import Model

STUDY_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data",
                         "eval", "study")
TAGS = ("keyword", "builtin", "call", "attribute", "name", "op", "number", "string", "comment")


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    family: str  # classification | retrieval | generation
    kind: str  # pair (text, label) | tagging | retrieval | choice
    splits: tuple
    what: str
    max_len: int  # tokens; >= the 99th percentile of the test split's lengths (retrieval: of its documents)
    shares_corpus: bool = False  # its text is in the study's pretraining corpus


TASKS = {t.name: t for t in (
    Task("next_sentence", "classification", "pair", ("train", "dev", "test"),
         "is B the sentence after A (Austen; negatives from the same chapter)", 112),
    Task("paraphrase", "classification", "pair", ("train", "dev", "test"),
         "is B the same sentence as A or one with a word swapped (Austen)", 128),
    Task("shuffle", "classification", "pair", ("train", "dev", "test"),
         "acceptability: the sentence or one with 3 neighbouring words permuted (Austen)", 64),
    Task("stdlib_tags", "classification", "tagging", ("train", "dev", "test"),
         "token-level: the Python token category of each subword (9 tags; stdlib code)", 128),
    Task("retrieval", "retrieval", "retrieval", ("train", "dev", "test"),
         "docstring summary -> function code (stdlib; every other function a distractor)", 128),
    Task("nextline", "generation", "choice", ("test",),
         "the next line of a held-out stdlib function vs 3 others (likelihood)", 192),
    Task("cloze_heldout", "generation", "choice", ("test",),
         "the last word of an Austen sentence vs 3 of similar frequency, held-out chapters", 64),
    Task("cloze_seen", "generation", "choice", ("test",),
         "the same on chapters that are in the pretraining corpus", 64, shares_corpus=True),
)}
ROLES = ("encoder", "decoder", "encoder-from-decoder", "decoder-from-encoder")
# (winner in the paper, the other, what the comparison asks), per family; effect = winner - other.
COMPARISONS = {
    "classification": (("encoder", "decoder", "encoder vs decoder"),
                       ("encoder", "encoder-from-decoder", "cross-objective: MLM from the start vs from the decoder")),
    "retrieval": (("encoder", "decoder", "encoder vs decoder"),
                  ("encoder", "encoder-from-decoder", "cross-objective: MLM from the start vs from the decoder")),
    "generation": (("decoder", "encoder", "decoder vs encoder (PLL)"),
                   ("decoder", "decoder-from-encoder", "cross-objective: CLM from the start vs from the encoder")),
}


def roles_of(task: Task) -> tuple:
    """The models a task is evaluated on: those of its family's comparisons (a model in none is not fine-tuned)."""
    return tuple(r for r in ROLES if any(r in (w, o) for w, o, _ in COMPARISONS[task.family]))


@dataclasses.dataclass(frozen=True)
class Budget:
    """Fine-tuning budgets and grids, fixed before the test split is scored (the study's protocol)."""

    lrs: tuple = (1e-3, 3e-3)
    seeds: int = 3
    epochs: float = 2.0
    batch_size: int = 32
    train_limit: int = 600  # first N training examples of each fine-tuned task
    dev_limit: int = 300
    test_limit: Optional[int] = None
    contrastive_lrs: tuple = (3e-4, 1e-3)
    contrastive_steps: tuple = (40, 100)
    query_len: int = 48
    max_len: Optional[int] = None  # every task's sequence length (None: each task's own, Task.max_len)

    @classmethod
    def smoke(cls):
        """Tiny budgets, one short length for every task (fewer shapes to compile): the plumbing, not a result."""
        return cls(lrs=(1e-3, 3e-3), seeds=3, epochs=1.0, batch_size=8, train_limit=32, dev_limit=16,
                   test_limit=24, contrastive_lrs=(1e-3,), contrastive_steps=(2, 4), max_len=32)

    def tag(self) -> str:
        """A short name of these budgets: evaluation caches are kept apart per budget, never mixed."""
        import hashlib
        return hashlib.sha1(repr(dataclasses.astuple(self)).encode()).hexdigest()[:8]


# ------------------------------------------------------------------------------------------------ task files

FIELDS = {  # kind -> {field: accepted types}
    "pair": {"text": (str,), "label": (int,)},
    "tagging": {"text": (str,), "spans": (list,)},
    "retrieval_train": {"query": (str,), "positive": (str,)},
    "retrieval": {"id": (str,), "query": (str,), "document": (str,)},
    "choice": {"context": (str,), "choices": (list,), "label": (int,)},
}


class TaskFileError(ValueError):
    """A missing or malformed task file; the message is one line naming the file and what is wrong."""


def files_of(task: Task) -> list[tuple[str, str]]:
    """(file name, field kind) of every file a task reads."""
    if task.kind == "choice":
        return [(f"{task.name}_test.jsonl", "choice")]
    out = []
    for split in task.splits:
        kind = "retrieval_train" if task.kind == "retrieval" and split == "train" else task.kind
        out.append((f"{task.name}_{split}.jsonl", kind))
    return out


def _check_row(row, kind: str) -> str:
    if not isinstance(row, dict):
        return f"a JSON object, got {type(row).__name__}"
    for field, types in FIELDS[kind].items():
        if field not in row:
            return f"field {field!r} is missing (expected fields {', '.join(FIELDS[kind])})"
        if not isinstance(row[field], types) or isinstance(row[field], bool):
            return f"field {field!r} is {type(row[field]).__name__}, expected {types[0].__name__}"
    if kind == "pair" and row["label"] not in (0, 1):
        return f"label {row['label']!r}, expected 0 or 1"
    if kind == "choice" and not (len(row["choices"]) >= 2 and 0 <= row["label"] < len(row["choices"])
                                 and all(isinstance(c, str) for c in row["choices"])):
        return f"label {row['label']!r} for {len(row['choices'])} choices; expected >= 2 strings and 0 <= label < choices"
    if kind == "tagging":
        for span in row["spans"]:
            if not (isinstance(span, list) and len(span) == 3 and all(isinstance(x, int) for x in span)
                    and 0 <= span[0] < span[1] <= len(row["text"]) and 0 <= span[2] < len(TAGS)):
                return f"span {span!r}, expected [start, end, tag] with 0 <= start < end <= len(text), 0 <= tag < {len(TAGS)}"
    return ""


def read_task_file(path: str, kind: str) -> list[dict]:
    """The rows of one task file; TaskFileError (one line) if it is missing, empty or a row is malformed."""
    if not os.path.isfile(path):
        raise TaskFileError(f"{path} is missing: the study's task files live in data/eval/study/ "
                            "(rebuild with python data/eval/build_study.py)")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskFileError(f"{path} line {i}: not JSON ({e.msg}); expected one JSON object per line with "
                                    f"fields {', '.join(FIELDS[kind])}") from None
            problem = _check_row(row, kind)
            if problem:
                raise TaskFileError(f"{path} line {i}: {problem}")
            rows.append(row)
    if not rows:
        raise TaskFileError(f"{path} holds no rows; expected one JSON object per line with fields "
                            f"{', '.join(FIELDS[kind])}")
    return rows


def load_tasks(task_dir: str = STUDY_DIR, names=None) -> dict:
    """{task: {split: rows}} of every study task, each file checked (so a bad file fails before any training)."""
    out = {}
    for name in names or TASKS:
        task = TASKS[name]
        out[name] = {}
        for fname, kind in files_of(task):
            split = fname[len(name) + 1:-len(".jsonl")]
            out[name][split] = read_task_file(os.path.join(task_dir, fname), kind)
    return out


# ------------------------------------------------------------------------------------------------ the runs


class Cache:
    """One JSON file per (model role, task) under `root`, rewritten after every finished run."""

    def __init__(self, root: str, role: str, task: str):
        self.path = os.path.join(root, role, f"{task}.json")
        self.data = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.data = json.load(f)

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        self.data[key] = value
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f)
        os.replace(tmp, self.path)  # an interrupted write never leaves half a file


def grid_of(task: Task, budget: Budget) -> list[dict]:
    if task.kind == "retrieval":
        return [dict(lr=lr, steps=s) for lr in budget.contrastive_lrs for s in budget.contrastive_steps]
    return [dict(lr=lr) for lr in budget.lrs]


def key_of(point: dict, seed: int) -> str:
    return ",".join(f"{k}={v:g}" for k, v in point.items()) + f",seed={seed}"


def _pair_run(model, data, point, seed, budget, task, log):
    config = classification.FinetuneConfig(lrs=(point["lr"],), epochs=budget.epochs, batch_size=budget.batch_size,
                                           max_len=task.max_len, seed=seed)
    clf = classification.fine_tune(model, data["train"], labels=(0, 1), config=config, log=log)
    score = lambda rows: (clf.logits([r["text"] for r in rows]).argmax(-1) == np.array(
        [r["label"] for r in rows])).astype(float)
    return float(score(data["dev"]).mean()), score(data["test"]).tolist()


def _tagging_run(model, data, point, seed, budget, task, log):
    config = classification.FinetuneConfig(epochs=budget.epochs, batch_size=budget.batch_size, max_len=task.max_len,
                                           seed=seed)
    params = tagging.fine_tune(model, data["train"], len(TAGS), point["lr"], config, log=log)
    score = lambda rows: tagging.item_accuracy(model, params, rows, task.max_len)
    return float(score(data["dev"]).mean()), score(data["test"]).tolist()


def per_query_ndcg(embedder, rows, query_len: int, doc_len: int) -> np.ndarray:
    """nDCG@10 of each row's query against all the split's documents (its own is the one relevant)."""
    queries = {r["id"]: r["query"] for r in rows}
    corpus = {r["id"]: r["document"] for r in rows}
    ranking = retrieval.rank(embedder, queries, corpus, k=10, query_len=query_len, doc_len=doc_len)
    return np.array([metrics.ndcg_at_k(ranking[r["id"]], {r["id"]: 1}) for r in rows])


def _retrieval_run(model, data, point, seed, budget, task, log):
    config = retrieval.ContrastiveConfig(lr=point["lr"], steps=int(point["steps"]), batch_size=budget.batch_size,
                                         query_len=budget.query_len, doc_len=task.max_len, seed=seed)
    emb = retrieval.contrastive_fine_tune(model, data["train"], config, log=log)
    score = lambda rows: per_query_ndcg(emb, rows, budget.query_len, task.max_len)
    return float(score(data["dev"]).mean()), score(data["test"]).tolist()


RUNS = {"pair": _pair_run, "tagging": _tagging_run, "retrieval": _retrieval_run}


def limit(data: dict, budget: Budget) -> dict:
    caps = dict(train=budget.train_limit, dev=budget.dev_limit, test=budget.test_limit)
    return {split: rows[:caps.get(split)] for split, rows in data.items()}


def evaluate(model: Model, task: Task, data: dict, budget: Budget, cache: Cache, log: Callable = print) -> dict:
    """{chosen, dev (per grid point: mean over seeds), scores (per test item, mean over the chosen point's seeds),
    binary (0/1 per item where the scores are: the majority of seeds for classification), n}."""
    data = limit(data, budget)
    if budget.max_len:
        task = dataclasses.replace(task, max_len=budget.max_len)
    if task.kind == "choice":
        got = cache.get("test")
        if got is None:
            out = likelihood.multiple_choice(model, data["test"], pll=model.arch == "encoder", task=task.name,
                                             max_len=task.max_len, per_item=True)
            got = out["correct"]
            cache.put("test", got)
        return dict(chosen=None, dev={}, scores=got, binary=got, n=len(got))
    def run(point, seed):
        key = key_of(point, seed)
        if cache.get(key) is None:
            log(f"{model.name} {task.name} {key} ...")
            d, t = RUNS[task.kind](model, data, point, seed, budget, task, log)
            cache.put(key, dict(dev=d, test=t))
        return cache.get(key)

    grid = grid_of(task, budget)
    dev = {key_of(point, 0).rsplit(",", 1)[0]: run(point, 0)["dev"] for point in grid}
    best = max(range(len(grid)), key=lambda i: dev[key_of(grid[i], 0).rsplit(",", 1)[0]])  # first of equals
    per_seed = np.array([run(grid[best], seed)["test"] for seed in range(budget.seeds)])
    scores = per_seed.mean(0)
    binary = (scores >= 0.5).astype(int).tolist() if task.kind == "pair" else None
    return dict(chosen=key_of(grid[best], 0).rsplit(",", 1)[0], dev=dev, scores=scores.tolist(), binary=binary,
                n=int(scores.size), seed_means=per_seed.mean(1).tolist())


def compare(results: dict, task: Task, winner: str, other: str, n_boot: int = 10_000) -> dict:
    """The paired comparison of two roles on one task: effect = winner - other (positive: the paper's direction),
    bootstrap CI and p, McNemar on 0/1 items where they exist, the observed MDE, and the verdict."""
    a, b = results[winner][task.name], results[other][task.name]
    boot = stats.paired_bootstrap(a["scores"], b["scores"], n_boot=n_boot)
    out = dict(task=task.name, family=task.family, n=boot["n"], winner_in_paper=winner, other=other,
               metric={"classification": "accuracy", "retrieval": "nDCG@10", "generation": "accuracy"}[task.family]
               + (" (per-snippet token accuracy)" if task.kind == "tagging" else ""),
               scores={winner: float(np.mean(a["scores"])), other: float(np.mean(b["scores"]))},
               effect=boot["effect"], ci=list(boot["ci"]), p=boot["p"],
               mde_planned=stats.mde(boot["n"]),
               mde_observed=stats.mde(boot["n"], sd=boot["sd_diff"] / np.sqrt(2)) if boot["sd_diff"] else 0.0)
    if a.get("binary") is not None and b.get("binary") is not None:
        out["mcnemar"] = stats.mcnemar(a["binary"], b["binary"])
    out["verdict"] = stats.verdict(out["effect"], out["p"], +1)
    return out


def comparisons(results: dict, tasks=None, n_boot: int = 10_000) -> list[dict]:
    out = []
    for name in tasks or TASKS:
        task = TASKS[name]
        for winner, other, what in COMPARISONS[task.family]:
            if name in results.get(winner, {}) and name in results.get(other, {}):
                out.append(dict(compare(results, task, winner, other, n_boot), question=what))
    return out
