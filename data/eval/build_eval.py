"""Builds the bundled evaluation data in data/eval/ from the bundled corpus and the CPython 3.11 standard library.

    python data/eval/build_eval.py [--stdlib=/root/.pyenv/versions/3.11.7/lib/python3.11]

Deterministic (a fixed seed and sorted inputs): rerunning writes byte-identical files. The pronoun templates
(`pronoun_templates.json`) are written by hand and are not produced here. See data/eval/README.md.
"""
import argparse
import ast
import collections
import json
import os
import random
import re
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "corpus")
# The folders the corpus builder leaves out of the standard library (data/build_corpus.py), left out here too.
SKIP_DIRS = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "distutils", "encodings", "pydoc_data", "ensurepip",
             "tkinter", "site-packages", "__pycache__"}
NOVELS = ("sense_and_sensibility", "pride_and_prejudice", "mansfield_park", "emma", "northanger_abbey", "persuasion")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    print(f"{os.path.relpath(path, HERE)}: {len(rows)} rows, {os.path.getsize(path):,} bytes")


# ------------------------------------------------------------------------------------------------------ Austen


def austen_paragraphs(doc):
    """Paragraphs of a chapter with Gutenberg's hard wrap undone; headings (all caps) dropped."""
    out = []
    for para in re.split(r"\n\s*\n", doc["text"]):
        text = " ".join(para.split())
        if not text or text.upper() == text:
            continue
        out.append(text)
    return out


def novel_classification(rng):
    """austen_novel: which of the six novels a ~60-word passage comes from. Chapters n % 4 == 0 are the test split."""
    split_rows = {"train": collections.defaultdict(list), "test": collections.defaultdict(list)}
    for doc in read_jsonl(os.path.join(CORPUS, "austen.jsonl")):
        _, novel, chapter = doc["id"].split("/")
        split = "test" if int(chapter) % 4 == 0 else "train"
        for para in austen_paragraphs(doc):
            words = para.split()
            if len(words) < 40:
                continue
            split_rows[split][novel].append(dict(text=" ".join(words[:60]), label=novel, doc_id=doc["id"]))
    caps = {"train": 160, "test": 60}
    for split, by_novel in split_rows.items():
        rows = []
        for novel in NOVELS:
            items = by_novel[novel]
            rng.shuffle(items)
            rows += items[:caps[split]]
        rng.shuffle(rows)
        write_jsonl(os.path.join(HERE, f"austen_novel_{split}.jsonl"), rows)


def austen_cloze(rng, n=250):
    """austen_cloze: the last word of a sentence from a test-split chapter against three words of similar corpus
    frequency."""
    docs = read_jsonl(os.path.join(CORPUS, "austen.jsonl"))
    counts = collections.Counter(w for d in docs for w in re.findall(r"[a-z]+", d["text"]))
    vocab = [w for w, c in counts.most_common() if len(w) >= 4 and c >= 5]
    rank = {w: i for i, w in enumerate(vocab)}
    items = []
    for doc in docs:
        if int(doc["id"].split("/")[2]) % 4:
            continue
        for para in austen_paragraphs(doc):
            for sent in re.split(r"(?<=[.!?])\s+", para):
                m = re.match(r"^(.*\S)\s+([a-z]+)([.!?])$", sent)
                if not m or not 10 <= len(sent.split()) <= 40 or '"' in sent or m.group(2) not in rank:
                    continue
                items.append((doc["id"], m.group(1), m.group(2)))
    rng.shuffle(items)
    rows = []
    for doc_id, context, word in items[:n]:
        r = rank[word]
        band = [w for w in vocab[max(0, r - 100):r + 100] if w != word]
        choices = [" " + w for w in rng.sample(band, 3)] + [" " + word]
        rng.shuffle(choices)
        rows.append(dict(context=context, choices=choices, label=choices.index(" " + word), doc_id=doc_id))
    write_jsonl(os.path.join(HERE, "austen_cloze.jsonl"), rows)


# ------------------------------------------------------------------------------------------------------ stdlib


def stdlib_files(root):
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        parts = [] if rel == "." else rel.split(os.sep)
        if parts and (parts[0] in SKIP_DIRS or any(p in SKIP_DIRS for p in parts)):
            dirnames[:] = []
            continue
        dirnames.sort()
        out += [os.path.normpath(os.path.join(rel, f)) for f in sorted(filenames) if f.endswith(".py")]
    return sorted(out)


def functions(path, source):
    """(summary, code without the docstring, body lines) of each documented function or method in a file."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or not node.body or not isinstance(node.body[0], ast.Expr):
            continue
        summary = " ".join(doc.split("\n\n")[0].split())
        if len(summary.split()) < 4 or len(summary) > 200:
            continue
        start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
        ds = node.body[0]
        code = lines[start:ds.lineno - 1] + lines[ds.end_lineno:node.end_lineno]
        code = textwrap.dedent("\n".join(code)).splitlines()
        code = [l for l in code if l.strip()]
        if len(code) < 3:
            continue
        out.append(dict(summary=summary, code=code, file=path, name=node.name))
    return out


def truncate(lines, limit):
    text = ""
    for line in lines:
        if len(text) + len(line) + 1 > limit:
            break
        text += line + "\n"
    return text.rstrip("\n") or lines[0][:limit]


def stdlib_tasks(rng, root):
    pretrain_ids = {d["id"] for d in read_jsonl(os.path.join(CORPUS, "python_stdlib.jsonl"))}
    files = stdlib_files(root)
    held, seen = [], []
    for path in files:
        with open(os.path.join(root, path), encoding="utf-8", errors="replace") as f:
            fns = functions(path, f.read())
        (seen if f"python_stdlib/{path}" in pretrain_ids else held).extend(fns)
    print(f"stdlib: {len(files)} files, functions with docstrings: {len(held)} held out, {len(seen)} in the corpus")

    def dedup(fns):
        by_summary = collections.defaultdict(list)
        for fn in fns:
            by_summary[fn["summary"]].append(fn)
        return [v[0] for k, v in sorted(by_summary.items()) if len(v) == 1]

    held, seen = dedup(held), dedup(seen)
    rng.shuffle(held)
    rng.shuffle(seen)
    # Retrieval: docstring summary -> the function's code (docstring removed). Evaluated on held-out files.
    queries, corpus, qrels = [], [], []
    for i, fn in enumerate(held[:600]):
        corpus.append(dict(id=f"d{i}", text=truncate(fn["code"], 400), source=f"{fn['file']}:{fn['name']}"))
        if i < 200:
            queries.append(dict(id=f"q{i}", text=fn["summary"]))
            qrels.append(dict(query_id=f"q{i}", doc_id=f"d{i}", score=1))
    write_jsonl(os.path.join(HERE, "stdlib_docstring_queries.jsonl"), queries)
    write_jsonl(os.path.join(HERE, "stdlib_docstring_corpus.jsonl"), corpus)
    write_jsonl(os.path.join(HERE, "stdlib_docstring_qrels.jsonl"), qrels)
    # Contrastive fine-tuning pairs from the files that are in the pretraining corpus.
    write_jsonl(os.path.join(HERE, "stdlib_docstring_train.jsonl"),
                [dict(query=fn["summary"], positive=truncate(fn["code"], 300), source=f"{fn['file']}:{fn['name']}")
                 for fn in seen[:1200]])
    # Multiple choice: the next line of a held-out function against lines of other functions at the same indent.
    by_indent = collections.defaultdict(list)
    for j, fn in enumerate(held):
        for line in fn["code"][1:]:
            if len(line.strip()) >= 12:
                by_indent[len(line) - len(line.lstrip())].append((j, line))
    rows = []
    for j, fn in enumerate(held[600:] + held[:600]):
        if len(rows) == 250:
            break
        code = fn["code"]
        if len(code) < 4:
            continue
        k = rng.randrange(2, min(len(code), 12))
        answer = code[k]
        indent = len(answer) - len(answer.lstrip())
        if len(answer.strip()) < 12 or len(by_indent[indent]) < 50:
            continue
        context = truncate(code[:k], 600) if len("\n".join(code[:k])) > 600 else "\n".join(code[:k])
        if not context.endswith(code[k - 1]):
            continue
        distractors = set()
        while len(distractors) < 3:
            _, line = rng.choice(by_indent[indent])
            if line.strip() != answer.strip():
                distractors.add(line)
        choices = ["\n" + c for c in sorted(distractors)] + ["\n" + answer]
        rng.shuffle(choices)
        rows.append(dict(context=context, choices=choices, label=choices.index("\n" + answer),
                         source=f"{fn['file']}:{fn['name']}"))
    write_jsonl(os.path.join(HERE, "stdlib_nextline.jsonl"), rows)
    with open(os.path.join(HERE, "stdlib_heldout_files.txt"), "w") as f:
        f.write("\n".join(p for p in files if f"python_stdlib/{p}" not in pretrain_ids) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--stdlib", default=os.path.dirname(os.__file__), help="CPython 3.11 Lib/ folder")
    args = p.parse_args()
    if sys.version_info[:2] != (3, 11):
        print(f"warning: the bundled files were built from CPython 3.11.7's Lib/; this is {sys.version.split()[0]}")
    novel_classification(random.Random(0))
    austen_cloze(random.Random(1))
    stdlib_tasks(random.Random(2), args.stdlib)


if __name__ == "__main__":
    main()
