"""Builds the bundled default corpus `data/corpus/*.jsonl` from packages that install on the project's machines.

    python data/build_corpus.py            # writes data/corpus/{austen,python_docs,python_stdlib}.jsonl

A miniature of Ettin's mixture, one JSONL file per source, one real document per line ({"id": ..., "text": ...}):

  austen         prose      Jane Austen's six novels, one document per chapter, from Debian's r-cran-janeaustenr
                            (the Project Gutenberg texts, public domain; package MIT).
  python_docs    reference  the reStructuredText sources of the Python 3.11 documentation, one document per page,
                            from Debian's python3.11-doc (PSF License).
  python_stdlib  code       Python source files of the CPython 3.11 standard library of the running interpreter
                            (PSF License), one document per file.

It downloads the two Debian packages with `apt-get download` (run `apt-get update` first) into a temporary folder and
unpacks them with `dpkg-deb -x`; nothing is installed. The sources' licence texts are copied to data/licenses/. It is not run by the tests or the default run: its output is
committed. The selection is deterministic: where a source is larger than its byte budget, documents are taken in the
order of the SHA-1 of their id (an order unrelated to content or name) until the budget is reached.
"""
import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import zlib

# Pinned so that a rebuild gives the same bytes; bump together with data/README.md.
AUSTEN_DEB = ("r-cran-janeaustenr", "1.0.0-1")
PYDOC_DEB = ("python3.11-doc", "3.11.2-6+deb12u9")
# Byte budgets (UTF-8 text, before JSON escaping) per source.
BUDGET = {"austen": None, "python_docs": 3_600_000, "python_stdlib": 3_600_000}
# Parts of the documentation that read as reference prose (release notes and C-API/distutils pages left out).
PYDOC_SECTIONS = ("tutorial", "howto", "reference", "faq", "using", "extending", "library")
# Standard-library folders left out: tests, vendored/legacy tools, GUI demos, generated tables and data.
STDLIB_SKIP = ("test", "tests", "idle_test", "site-packages", "idlelib", "turtledemo", "lib2to3", "distutils",
               "encodings", "pydoc_data", "ensurepip", "tkinter", "config-3.11-x86_64-linux-gnu", "__phello__",
               "lib-dynload", "__pycache__")
NOVELS = {"sensesensibility": "sense_and_sensibility", "prideprejudice": "pride_and_prejudice",
          "mansfieldpark": "mansfield_park", "emma": "emma", "northangerabbey": "northanger_abbey",
          "persuasion": "persuasion"}


# ---------------------------------------------------------------------------------------------------------------
# R's lazy-load database (how an R package stores its data sets), read without R.

class _RReader:
    """Reads R's XDR serialization (formats 2 and 3): pairlists, vectors and strings, which is all a data set uses."""

    def __init__(self, buf: bytes):
        self.buf, self.pos, self.refs = buf, 0, []

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.buf, self.pos)
        self.pos += 4
        return value

    def take(self, n: int) -> bytes:
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def header(self):
        if self.take(2) != b"X\n":
            raise ValueError("not an R XDR serialization")
        version = self.int()
        self.int(), self.int()  # writer and minimal reader R versions
        if version == 3:
            self.take(self.int())  # native encoding name

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == 254:  # NILVALUE_SXP
            return None
        if kind == 255:  # REFSXP: a symbol seen before
            return self.refs[(flags >> 8 or self.int()) - 1]
        if kind == 1:  # SYMSXP
            symbol = ("symbol", self.item())
            self.refs.append(symbol)
            return symbol
        if kind == 9:  # CHARSXP
            n = self.int()
            return None if n == -1 else self.take(n).decode("utf-8", "replace")
        if kind == 2:  # LISTSXP, a pairlist: [(tag, value), ...]
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            head = self.item()
            return [(tag[1] if tag else None, head)] + (self.item() or [])
        if kind in (16, 19):  # STRSXP, VECSXP
            value = [self.item() for _ in range(self.int())]
        elif kind in (10, 13):  # LGLSXP, INTSXP
            n = self.int()
            value = list(struct.unpack(f">{n}i", self.take(4 * n)))
        elif kind == 14:  # REALSXP
            n = self.int()
            value = list(struct.unpack(f">{n}d", self.take(8 * n)))
        else:
            raise ValueError(f"R type {kind} is not supported by this reader")
        if has_attr:
            attributes = dict(self.item())
            if "names" in attributes:
                value = dict(zip(attributes["names"], value))
        return value


def _unserialize(buf: bytes):
    reader = _RReader(buf)
    reader.header()
    return reader.item()


def read_r_lazyload(stem: str) -> dict:
    """The objects of an R lazy-load database `stem.rdx` (gzip'd index) + `stem.rdb` (zlib'd records)."""
    with open(stem + ".rdx", "rb") as f:
        index = _unserialize(gzip.decompress(f.read()))
    with open(stem + ".rdb", "rb") as f:
        blob = f.read()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        record = blob[int(offset):int(offset) + int(length)]
        objects[name] = _unserialize(zlib.decompress(record[4:]))  # 4-byte length, then zlib
    return objects


# ---------------------------------------------------------------------------------------------------------------

def unpack_deb(name: str, version: str, workdir: str) -> str:
    """Downloads one Debian package (no install) and unpacks it; returns the unpacked root."""
    subprocess.run(["apt-get", "download", f"{name}={version}"], cwd=workdir, check=True)
    deb = next(f for f in os.listdir(workdir) if f.startswith(name + "_") and f.endswith(".deb"))
    root = os.path.join(workdir, name)
    subprocess.run(["dpkg-deb", "-x", os.path.join(workdir, deb), root], check=True)
    return root


LICENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "licenses")


def keep_licence(path: str, name: str) -> None:
    os.makedirs(LICENCE_DIR, exist_ok=True)
    shutil.copyfile(path, os.path.join(LICENCE_DIR, name))


def clean(text: str) -> str:
    """Trailing whitespace off each line, blank lines off both ends; the rest as it was."""
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def austen_docs(workdir: str):
    root = unpack_deb(*AUSTEN_DEB, workdir)
    keep_licence(os.path.join(root, "usr/share/doc/r-cran-janeaustenr/copyright"), "janeaustenr-copyright.txt")
    novels = read_r_lazyload(os.path.join(root, "usr/lib/R/site-library/janeaustenr/data/Rdata"))
    heading = re.compile(r"^(CHAPTER|Chapter) [0-9IVXLC]+\.?$")
    for key, slug in NOVELS.items():
        # A chapter runs from its heading to the next; the title page stays with the first chapter.
        chapters, current, seen_heading = [], [], False
        for line in novels[key]:
            line = line or ""
            if heading.match(line.strip()):
                if seen_heading:
                    chapters.append(current)
                    current = []
                seen_heading = True
            current.append(line)
        chapters.append(current)
        for i, lines in enumerate(chapters, 1):
            yield f"austen/{slug}/{i:03d}", clean("\n".join(lines))


def pydoc_docs(workdir: str):
    root = unpack_deb(*PYDOC_DEB, workdir)
    keep_licence(os.path.join(root, "usr/share/doc/python3.11-doc/copyright"), "python3.11-doc-copyright.txt")
    sources = os.path.join(root, "usr/share/doc/python3.11/html/_sources")
    for section in PYDOC_SECTIONS:
        for dirpath, _, files in os.walk(os.path.join(sources, section)):
            for name in files:
                if name.endswith(".rst.txt"):
                    path = os.path.join(dirpath, name)
                    with open(path, encoding="utf-8") as f:
                        rel = os.path.relpath(path, sources)[:-len(".txt")]
                        yield f"python_docs/{rel}", clean(f.read())


def stdlib_docs(stdlib: str):
    keep_licence(os.path.join(stdlib, "LICENSE.txt"), "python-LICENSE.txt")
    for dirpath, dirs, files in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in STDLIB_SKIP]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    raw = f.read()
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    print(f"skipping non-UTF-8 {path}", file=sys.stderr)
                    continue
                yield f"python_stdlib/{os.path.relpath(path, stdlib)}", clean(text)


def select(docs, budget):
    """Non-empty documents, sampled in SHA-1-of-id order up to `budget` bytes, then sorted by id."""
    docs = [(i, t) for i, t in docs if t.strip()]
    if budget is not None:
        docs.sort(key=lambda d: hashlib.sha1(d[0].encode()).hexdigest())
        kept, total = [], 0
        for doc_id, text in docs:
            size = len(text.encode())
            if total + size > budget:
                continue
            kept.append((doc_id, text))
            total += size
        docs = kept
    return sorted(docs)


def write_jsonl(path: str, docs) -> tuple[int, int]:
    with open(path, "w", encoding="utf-8") as f:
        for doc_id, text in docs:
            f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
    return len(docs), os.path.getsize(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus"))
    parser.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"],
                        help="the CPython standard library folder (default: the running interpreter's)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        os.chmod(workdir, 0o777)  # apt-get download drops to the _apt user when it can
        sources = {
            "austen": austen_docs(workdir),
            "python_docs": pydoc_docs(workdir),
            "python_stdlib": stdlib_docs(args.stdlib),
        }
        for name, docs in sources.items():
            n, size = write_jsonl(os.path.join(args.out, f"{name}.jsonl"), select(docs, BUDGET[name]))
            print(f"{name}: {n} documents, {size} bytes")


if __name__ == "__main__":
    main()
