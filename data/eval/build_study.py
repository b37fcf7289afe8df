"""Builds the miniature study's task files in data/eval/study/ (the study: experiments/study.sh, docs in its README).

    python data/eval/build_study.py [--stdlib=/root/.pyenv/versions/3.11.7/lib/python3.11] [--out=data/eval/study]

Deterministic (fixed seeds, sorted inputs): rerunning writes byte-identical files. Splits are disjoint by source:
Austen chapters n % 4 == 0 are the test split and are left out of the study's pretraining (austen_heldout.txt),
chapters n % 4 == 2 the dev split, the rest train; stdlib test items come from the 201 files not in the corpus
(stdlib_heldout_files.txt), train and dev items from the corpus's files, dev functions disjoint from train ones.
Sizes: every test split has SIZES["test"] items where the source allows (the n that detects a 5-point difference with
80% power at a 50% accuracy: ettin_jax.evaluation.stats.n_for_mde(0.05) = 1570).
"""
import argparse
import collections
import io
import json
import keyword
import os
import random
import re
import sys
import tokenize

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from build_eval import CORPUS, austen_paragraphs, functions, read_jsonl, truncate  # noqa: E402

SIZES = dict(train=1000, dev=500, test=1600)
TAG_SIZES = dict(train=1000, dev=300, test=1600)  # a snippet holds ~60 tagged tokens
SEP = " [SEP] "  # how sentence pairs are joined (as ettin_jax.evaluation.tasks.glue_split)
TAGS = ("keyword", "builtin", "call", "attribute", "name", "op", "number", "string", "comment")
BUILTINS = frozenset(dir(__builtins__) if isinstance(__builtins__, type(sys)) else __builtins__)


def write_jsonl(out, name, rows):
    path = os.path.join(out, name)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    print(f"{name}: {len(rows)} rows, {os.path.getsize(path):,} bytes")


# ------------------------------------------------------------------------------------------------------ Austen


def austen_split(doc_id: str) -> str:
    chapter = int(doc_id.split("/")[2])
    return "test" if chapter % 4 == 0 else "dev" if chapter % 4 == 2 else "train"


def austen_sentences():
    """{split: [(doc_id, [sentences of a paragraph], ...)]}: sentences of 8-40 words, grouped by paragraph."""
    out = collections.defaultdict(list)
    for doc in read_jsonl(os.path.join(CORPUS, "austen.jsonl")):
        for para in austen_paragraphs(doc):
            sents = [s for s in re.split(r"(?<=[.!?])\s+", para)]
            out[austen_split(doc["id"])].append((doc["id"], sents))
    return out


def ok(sent):
    return 8 <= len(sent.split()) <= 40


def balanced(rng, pos, neg, n):
    """n rows, half of each label (as many as both lists allow), shuffled."""
    k = min(n // 2, len(pos), len(neg))
    rows = pos[:k] + neg[:k]
    rng.shuffle(rows)
    return rows


def next_sentence(rng, paras, n):
    """Is B the sentence that follows A? Negatives: a sentence of the same chapter at least 5 sentences away."""
    by_doc = collections.defaultdict(list)
    for doc_id, sents in paras:
        by_doc[doc_id] += [s for s in sents if ok(s)]
    anchors = [(doc_id, sents[i], sents[i + 1]) for doc_id, sents in paras for i in range(len(sents) - 1)
               if ok(sents[i]) and ok(sents[i + 1])]
    rng.shuffle(anchors)
    pos, neg = [], []
    for j, (doc_id, a, b) in enumerate(anchors):
        if j % 2 == 0:
            pos.append(dict(text=a + SEP + b, label=1, doc_id=doc_id))
            continue
        pool = by_doc[doc_id]
        i = pool.index(a) if a in pool else 0
        far = [s for k, s in enumerate(pool) if abs(k - i) >= 5]
        if far:
            neg.append(dict(text=a + SEP + rng.choice(far), label=0, doc_id=doc_id))
    return balanced(rng, pos, neg, n)


def word_bands(docs):
    counts = collections.Counter(w for d in docs for w in re.findall(r"[a-z]+", d["text"]))
    vocab = [w for w, c in counts.most_common() if len(w) >= 4 and c >= 5]
    return vocab, {w: i for i, w in enumerate(vocab)}


def surface(sent):
    """The sentence lower-cased with its punctuation dropped: same words, another surface."""
    return " ".join(re.findall(r"[a-z']+", sent.lower()))


def paraphrase(rng, paras, n, vocab, rank):
    """Is B the same sentence as A (lower-cased, punctuation dropped) or one with a word swapped for another of
    similar corpus frequency? Both kinds of B get the same surface change, so only the swapped word tells."""
    sents = [(doc_id, s) for doc_id, ss in paras for s in ss if ok(s)]
    rng.shuffle(sents)
    pos, neg = [], []
    for j, (doc_id, s) in enumerate(sents):
        b = surface(s).split()
        if j % 2 == 0:
            pos.append(dict(text=s + SEP + " ".join(b), label=1, doc_id=doc_id))
            continue
        slots = [i for i, w in enumerate(b) if w in rank]
        if not slots:
            continue
        i = rng.choice(slots)
        r = rank[b[i]]
        b[i] = rng.choice([w for w in vocab[max(0, r - 100):r + 100] if w != b[i]])
        neg.append(dict(text=s + SEP + " ".join(b), label=0, doc_id=doc_id))
    return balanced(rng, pos, neg, n)


def shuffle_acceptability(rng, paras, n):
    """Is the sentence as written (1) or with a window of 3 neighbouring words permuted (0)? CoLA in miniature."""
    sents = [(doc_id, s) for doc_id, ss in paras for s in ss if ok(s)]
    rng.shuffle(sents)
    pos, neg = [], []
    for j, (doc_id, s) in enumerate(sents):
        words = s.split()
        if j % 2 == 0:
            pos.append(dict(text=s, label=1, doc_id=doc_id))
            continue
        i = rng.randrange(0, len(words) - 2)
        window = words[i:i + 3]
        perms = [p for p in ((0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
                 if [window[k] for k in p] != window]
        if not perms:
            continue
        words[i:i + 3] = [window[k] for k in rng.choice(perms)]
        neg.append(dict(text=" ".join(words), label=0, doc_id=doc_id))
    return balanced(rng, pos, neg, n)


def cloze(rng, paras, n, vocab, rank):
    """The last word of a sentence (8-40 words, no quotation marks) vs 3 words within 100 frequency ranks."""
    items = []
    for doc_id, sents in paras:
        for sent in sents:
            m = re.match(r"^(.*\S)\s+([a-z]+)([.!?])$", sent)
            if m and ok(sent) and '"' not in sent and m.group(2) in rank:
                items.append((doc_id, m.group(1), m.group(2)))
    rng.shuffle(items)
    rows = []
    for doc_id, context, word in items[:n]:
        r = rank[word]
        choices = [" " + w for w in rng.sample([w for w in vocab[max(0, r - 100):r + 100] if w != word], 3)]
        choices.append(" " + word)
        rng.shuffle(choices)
        rows.append(dict(context=context, choices=choices, label=choices.index(" " + word), doc_id=doc_id))
    return rows


def austen_tasks(out):
    docs = read_jsonl(os.path.join(CORPUS, "austen.jsonl"))
    vocab, rank = word_bands(docs)
    by_split = austen_sentences()
    for name, build in (("next_sentence", lambda rng, p, n: next_sentence(rng, p, n)),
                        ("paraphrase", lambda rng, p, n: paraphrase(rng, p, n, vocab, rank)),
                        ("shuffle", lambda rng, p, n: shuffle_acceptability(rng, p, n))):
        for k, split in enumerate(("train", "dev", "test")):
            write_jsonl(out, f"{name}_{split}.jsonl", build(random.Random(f"{name}/{split}"), by_split[split],
                                                             SIZES[split]))
    # Zero-shot likelihood: held-out chapters, and (the corpus sharing text with the task) chapters in pretraining.
    write_jsonl(out, "cloze_heldout_test.jsonl", cloze(random.Random("cloze/test"), by_split["test"], SIZES["test"],
                                                                     vocab, rank))
    write_jsonl(out, "cloze_seen_test.jsonl", cloze(random.Random("cloze/seen"), by_split["train"], SIZES["test"],
                                                                  vocab, rank))
    with open(os.path.join(out, "austen_heldout.txt"), "w") as f:
        f.write("\n".join(d["id"] for d in docs if austen_split(d["id"]) == "test") + "\n")


# ------------------------------------------------------------------------------------------------------ stdlib


def tag_spans(source):
    """[(start, end, tag)] character spans of a file's Python tokens, tags from TAGS; [] if it does not tokenize."""
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    try:
        toks = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return []
    spans = []
    sig = [t for t in toks if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                                             tokenize.ENDMARKER)]
    for j, t in enumerate(sig):
        nxt = sig[j + 1].string if j + 1 < len(sig) else ""
        prev = sig[j - 1].string if j else ""
        if t.type == tokenize.NAME:
            tag = ("keyword" if keyword.iskeyword(t.string) else "call" if nxt == "(" else
                   "attribute" if prev == "." else "builtin" if t.string in BUILTINS else "name")
        elif t.type == tokenize.OP:
            tag = "op"
        elif t.type == tokenize.NUMBER:
            tag = "number"
        elif t.type == tokenize.STRING or t.type in getattr(tokenize, "FSTRING_TYPES", ()):
            tag = "string"
        elif t.type == tokenize.COMMENT:
            tag = "comment"
        else:
            continue
        spans.append((starts[t.start[0] - 1] + t.start[1], starts[t.end[0] - 1] + t.end[1], tag))
    return spans


def snippets(source, spans, max_chars=300):
    """Cuts of consecutive whole lines (<= max_chars, >= 4 tokens) that no token crosses, with their spans."""
    out, pos = [], 0
    lines = source.splitlines(keepends=True)
    start, text = 0, ""
    for line in lines:
        if len(text) + len(line) > max_chars and text:
            out.append((start, text))
            start, text = pos, ""
        text += line
        pos += len(line)
    if text:
        out.append((start, text))
    rows = []
    for s, t in out:
        e = s + len(t)
        inside = [(a - s, b - s, tag) for a, b, tag in spans if s <= a < e]
        if len(t) > max_chars or any(b > len(t) for _, b, _ in inside) or len(inside) < 4:
            continue
        rows.append(dict(text=t.rstrip("\n"), spans=[[a, b, TAGS.index(tag)] for a, b, tag in inside]))
    return rows


def stdlib_sources(root):
    """(held-out {path: source}, in-corpus {path: source}): held-out from the CPython Lib/ folder, in-corpus from
    data/corpus/python_stdlib.jsonl (so those need no CPython)."""
    with open(os.path.join(HERE, "stdlib_heldout_files.txt")) as f:
        held_paths = [l.strip() for l in f if l.strip()]
    held = {}
    for p in held_paths:
        with open(os.path.join(root, p), encoding="utf-8", errors="replace") as f:
            held[p] = f.read()
    seen = {d["id"].split("/", 1)[1]: d["text"] for d in read_jsonl(os.path.join(CORPUS, "python_stdlib.jsonl"))}
    return held, dict(sorted(seen.items()))


def stdlib_tasks(out, root):
    held, seen = stdlib_sources(root)
    # Token tagging: test snippets from held-out files; train / dev snippets from corpus files, split by file.
    rng = random.Random("tags")
    seen_paths = sorted(seen)
    rng.shuffle(seen_paths)
    dev_paths = set(seen_paths[:len(seen_paths) // 5])
    pools = collections.defaultdict(list)
    for split, files in (("test", held), ("seen", seen)):
        for p, src in sorted(files.items()):
            for row in snippets(src, tag_spans(src)):
                row["source"] = p
                pools["test" if split == "test" else "dev" if p in dev_paths else "train"].append(row)
    for split in ("train", "dev", "test"):
        rows = pools[split]
        rng.shuffle(rows)
        write_jsonl(out, f"stdlib_tags_{split}.jsonl", rows[:TAG_SIZES[split]])

    def dedup(fns):
        by_summary = collections.defaultdict(list)
        for fn in fns:
            by_summary[fn["summary"]].append(fn)
        return [v[0] for _, v in sorted(by_summary.items()) if len(v) == 1]

    held_fns = dedup([fn for p, s in held.items() for fn in functions(p, s)])
    seen_fns = dedup([fn for p, s in seen.items() for fn in functions(p, s)])
    held_summaries = {fn["summary"] for fn in held_fns}
    seen_fns = [fn for fn in seen_fns if fn["summary"] not in held_summaries]
    rng = random.Random("retrieval")
    rng.shuffle(held_fns)
    rng.shuffle(seen_fns)
    # Retrieval: docstring summary -> the function's code (docstring removed); every other document of the split is
    # a distractor. Train pairs and dev queries from corpus files (disjoint functions), test from held-out files.
    def qd(fns, limit):
        return [dict(id=f"q{i}", query=fn["summary"], document=truncate(fn["code"], 400),
                     source=f"{fn['file']}:{fn['name']}") for i, fn in enumerate(fns[:limit])]
    write_jsonl(out, "retrieval_test.jsonl", qd(held_fns, SIZES["test"]))
    write_jsonl(out, "retrieval_dev.jsonl", qd(seen_fns, SIZES["dev"]))
    write_jsonl(out, "retrieval_train.jsonl", [dict(query=fn["summary"], positive=truncate(fn["code"], 300),
                                                    source=f"{fn['file']}:{fn['name']}")
                                               for fn in seen_fns[SIZES["dev"]:SIZES["dev"] + SIZES["train"]]])
    write_jsonl(out, "nextline_test.jsonl", nextline(random.Random("nextline"), held_fns, SIZES["test"]))


def nextline(rng, fns, n):
    """The next line of a held-out function (after line k, 2 <= k < 12) vs 3 lines of other held-out functions at
    the same indentation (as data/eval's stdlib_nextline, one item per function)."""
    by_indent = collections.defaultdict(list)
    for fn in fns:
        for line in fn["code"][1:]:
            if len(line.strip()) >= 12:
                by_indent[len(line) - len(line.lstrip())].append(line)
    rows, used = [], set()
    for fn in fns + fns:  # a second pass (another line of each function) where one item per function is too few
        if len(rows) == n:
            break
        code = fn["code"]
        if len(code) < 4:
            continue
        k = rng.randrange(2, min(len(code), 12))
        answer = code[k]
        indent = len(answer) - len(answer.lstrip())
        context = "\n".join(code[:k])
        if (fn["file"], fn["name"], k) in used:
            continue
        used.add((fn["file"], fn["name"], k))
        if len(answer.strip()) < 12 or len(by_indent[indent]) < 50 or len(context) > 600:
            continue
        distractors = set()
        while len(distractors) < 3:
            line = rng.choice(by_indent[indent])
            if line.strip() != answer.strip():
                distractors.add(line)
        choices = ["\n" + c for c in sorted(distractors)] + ["\n" + answer]
        rng.shuffle(choices)
        rows.append(dict(context=context, choices=choices, label=choices.index("\n" + answer),
                         source=f"{fn['file']}:{fn['name']}"))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stdlib", default=os.path.dirname(os.__file__), help="CPython 3.11 Lib/ folder")
    p.add_argument("--out", default=os.path.join(HERE, "study"))
    args = p.parse_args()
    if sys.version_info[:2] != (3, 11):
        print(f"warning: the bundled files were built from CPython 3.11.7's Lib/; this is {sys.version.split()[0]}")
    os.makedirs(args.out, exist_ok=True)
    austen_tasks(args.out)
    stdlib_tasks(args.out, args.stdlib)


if __name__ == "__main__":
    main()
