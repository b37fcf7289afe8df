"""The task registry: each task's kind, data and scoring, by name.

Bundled tasks (data/eval/, see its README): `austen_novel` (classification), `stdlib_docstring` (retrieval),
`austen_cloze` and `stdlib_nextline` (zero-shot multiple choice by likelihood), `pronouns` (pronoun preference).
GLUE tasks (`glue/sst2`, `glue/cola`, ...) read TFDS-prepared data from a local `--glue_dir` and are used only when
it is present; nothing is ever downloaded. The data must be ArrayRecord, which `tfds.data_source` reads without
TensorFlow: `tfds build glue/sst2 --data_dir=DIR --file_format=array_record` (TFDS's default, TFRECORD, is refused
with that command).
"""
from __future__ import annotations

import glob
import json
import os
from typing import Optional

from ettin_jax.evaluation import classification, likelihood, pronouns, retrieval
from ettin_jax.evaluation.models import Model

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data",
                        "eval")

# name -> (kind, what it measures)
TASKS = {
    "austen_novel": ("classification", "which of Austen's six novels a 60-word passage is from (6 classes)"),
    "stdlib_docstring": ("retrieval", "docstring summary -> function code, held-out stdlib files"),
    "austen_cloze": ("multiple_choice", "last word of an Austen sentence vs 3 same-frequency words"),
    "stdlib_nextline": ("multiple_choice", "next line of a held-out stdlib function vs 3 lines of others"),
    "pronouns": ("pronouns", "he / she / they preference on occupation templates"),
}
GLUE = {  # TFDS name -> (text fields, metric)
    "cola": (("sentence",), "mcc"), "sst2": (("sentence",), "accuracy"), "mrpc": (("sentence1", "sentence2"), "accuracy"),
    "qqp": (("question1", "question2"), "accuracy"), "mnli": (("premise", "hypothesis"), "accuracy"),
    "qnli": (("question", "sentence"), "accuracy"), "rte": (("sentence1", "sentence2"), "accuracy"),
    "stsb": (("sentence1", "sentence2"), None),
}
# The headline number of each kind, for tables and plots.
HEADLINE = {"classification": "accuracy", "retrieval": "ndcg@10", "multiple_choice": "acc", "pronouns": "neutral"}


def kind_of(name: str) -> str:
    if name in TASKS:
        return TASKS[name][0]
    if name.startswith("glue/"):
        sub = name.split("/", 1)[1]
        if sub not in GLUE or GLUE[sub][1] is None:
            raise ValueError(f"unknown GLUE task {name!r}; expected one of "
                             f"{', '.join('glue/' + k for k, v in GLUE.items() if v[1])}")
        return "classification"
    raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}, glue/<task> or 'all'")


def resolve(names) -> list[str]:
    out = []
    for n in names:
        out += list(TASKS) if n == "all" else [n]
    for n in out:
        kind_of(n)
    return out


def read_jsonl(name: str, data_dir: Optional[str] = None) -> list[dict]:
    path = os.path.join(data_dir or DATA_DIR, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the bundled evaluation data lives in data/eval/ "
                                "(rebuild with python data/eval/build_eval.py)")
    with open(path) as f:
        return [json.loads(line) for line in f]


def glue_command(task: str, data_dir: str = "DIR") -> str:
    """The command that prepares `glue/<task>` the way `glue_split` reads it (ArrayRecord, random access)."""
    return f"tfds build glue/{task} --data_dir={data_dir} --file_format=array_record"


def check_glue(task: str, glue_dir: Optional[str]) -> str:
    """The folder of the prepared `glue/<task>` under `glue_dir`; a clear error if it is missing or in a format
    `tfds.data_source` cannot read. TFDS builds TFRECORD by default, and random access without TensorFlow needs
    ArrayRecord, so a default `tfds build` gives data this code cannot read."""
    how = f"prepare it elsewhere with `{glue_command(task)}` and copy DIR here; this code never downloads it"
    task_dir = os.path.join(glue_dir or "", "glue", task)
    if not glue_dir or not os.path.isdir(task_dir):
        raise FileNotFoundError(f"GLUE task {task!r} needs TFDS-prepared data: --glue_dir=DIR with DIR/glue/{task}/ "
                                f"(got --glue_dir={glue_dir!r}, no {task_dir}); {how}")
    infos = sorted(glob.glob(os.path.join(task_dir, "*", "dataset_info.json")))
    if not infos:
        raise FileNotFoundError(f"{task_dir} holds no prepared version (no */dataset_info.json); {how}")
    with open(infos[-1]) as f:
        fmt = json.load(f).get("fileFormat", "tfrecord")  # TFDS omits the field for its default, TFRECORD
    if fmt != "array_record":
        raise ValueError(f"{os.path.dirname(infos[-1])} is prepared as {fmt}, but reading it without TensorFlow "
                         f"needs array_record; rebuild it with `{glue_command(task, glue_dir)}`")
    return os.path.dirname(infos[-1])


def glue_split(task: str, split: str, glue_dir: Optional[str]) -> list[dict]:
    """{text, label} examples of a GLUE task from TFDS-prepared data under `glue_dir` (never downloads).

    The data must be in ArrayRecord (`glue_command`); pairs are joined with the tokenizer's separator text
    ' [SEP] '. Labels are TFDS's integer class ids.
    """
    if task not in GLUE or GLUE[task][1] is None:
        kind_of(f"glue/{task}")  # the error naming the known tasks
    version_dir = check_glue(task, glue_dir)
    import tensorflow_datasets as tfds
    fields, _ = GLUE[task]
    try:
        source = tfds.data_source(f"glue/{task}", data_dir=glue_dir, split=split, download=False)
    except NotImplementedError as e:  # a format check_glue did not foresee: still one clear line
        raise ValueError(f"{version_dir} cannot be read by tfds.data_source ({str(e).splitlines()[0]}); rebuild it "
                         f"with `{glue_command(task, glue_dir)}`") from None

    def text(ex, f):
        v = ex[f]
        return v.decode() if isinstance(v, bytes) else str(v)
    return [dict(text=" [SEP] ".join(text(ex, f) for f in fields), label=int(ex["label"])) for ex in source]


def run(name: str, model: Model, *, data_dir: Optional[str] = None, glue_dir: Optional[str] = None,
        pll: bool = False, finetune: classification.FinetuneConfig = classification.FinetuneConfig(),
        contrastive: retrieval.ContrastiveConfig = retrieval.ContrastiveConfig(), limit: Optional[int] = None,
        save_retrieval: Optional[str] = None, log=print) -> dict:
    """Runs one task on one model; returns its metrics (floats) and `n`, the number of items (sentences, queries)
    scored (standard errors come from it). `limit`: only the first items of a multiple-choice task (a cheaper,
    noisier score). `save_retrieval`: a folder under which a retrieval task's fine-tuned encoder is exported
    (SAVE_RETRIEVAL/<model name>/<task>, loadable by sentence-transformers)."""
    kind = kind_of(name)
    if kind == "multiple_choice":
        likelihood.require_scorer(model, pll, name)
        items = read_jsonl(f"{name}.jsonl", data_dir)[:limit]
        out = likelihood.multiple_choice(model, items, pll=pll, task=name, max_len=contrastive.doc_len)
        out["n"] = len(items)
        return out
    if kind == "pronouns":
        with open(os.path.join(data_dir or DATA_DIR, "pronoun_templates.json")) as f:
            return pronouns.probe(model, json.load(f))
    if kind == "classification":
        if name.startswith("glue/"):
            task = name.split("/", 1)[1]
            train = glue_split(task, "train", glue_dir)
            test = glue_split(task, "validation_matched" if task == "mnli" else "validation", glue_dir)
        else:
            train, test = read_jsonl(f"{name}_train.jsonl", data_dir), read_jsonl(f"{name}_test.jsonl", data_dir)
        from ettin_jax.evaluation.metrics import majority_baseline
        clf = classification.fine_tune(model, train, config=finetune, log=log)
        out = classification.evaluate(clf, test)
        out["majority"] = majority_baseline([ex["label"] for ex in train], [ex["label"] for ex in test])
        out["n"] = len(test)  # test examples: the standard error of the accuracy
        return out
    # retrieval
    queries = {r["id"]: r["text"] for r in read_jsonl(f"{name}_queries.jsonl", data_dir)}
    corpus = {r["id"]: r["text"] for r in read_jsonl(f"{name}_corpus.jsonl", data_dir)}
    qrels = {}
    for r in read_jsonl(f"{name}_qrels.jsonl", data_dir):
        qrels.setdefault(r["query_id"], {})[r["doc_id"]] = r["score"]
    lens = dict(query_len=contrastive.query_len, doc_len=contrastive.doc_len)
    zero = retrieval.evaluate(retrieval.Embedder(model), queries, corpus, qrels, **lens)
    tuned = retrieval.contrastive_fine_tune(model, read_jsonl(f"{name}_train.jsonl", data_dir), contrastive, log=log)
    out = retrieval.evaluate(tuned, queries, corpus, qrels, **lens)
    if save_retrieval and model.arch == "encoder":
        folder = tuned.export(os.path.join(save_retrieval, model.name.replace(":", "_").replace("/", "_"), name))
        log(f"{model.name}: the {name} fine-tune exported to {folder}")
    elif save_retrieval:
        log(f"{model.name}: not exported (a {model.arch}; only encoders are exported for sentence-transformers)")
    out.update({f"zero_shot_{k}": v for k, v in zero.items()})
    out["n"] = len(qrels)  # judged queries: the standard error of the means
    return out
