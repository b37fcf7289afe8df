"""Document sources: random access to documents, each {source, doc_id, text} or {source, doc_id, input_ids}.

Formats (`format` in a source's config):
  jsonl    one document per line; field `text_field` ("text"), optional `id_field` ("id"; else file:line).
  text     one document per file (a folder is read recursively, files in sorted order); id = relative path.
           One document per file keeps a document's structure (code, chapters) whole; split a file into
           several if it holds several documents.
  parquet  one document per row; column `text_field`, optional `id_field` (else file:row).
  tfds     `tfds.data_source(path, split=split, data_dir=data_dir)` (ArrayRecord; no TensorFlow needed);
           feature `text_field` (bytes or str), optional `id_field`.
  mds      Ettin's pre-tokenized MosaicML MDS shards (see mds.py): columns `input_ids` (uint32) and `id` (str);
           `path` is a folder with index.json, or a folder whose sub-folders hold them.
`path` may be a file, a folder or a glob, local or any filesystem etils.epath reads (gs:// where installed).

Bad input never crashes a run: a document that is not UTF-8, is empty, has NUL bytes (binary), is not JSON or lacks
the text field is skipped and counted (`DataStats`, reason in `skipped/<reason>`, named by file and line/row/sample in
the first few log lines); `load` returns None for it. An MDS shard whose hash, zstd frame or offset table is wrong
(mds.py) refuses the run with one line naming the file, or with `on_bad_sample="skip"` its samples are skipped
(`skipped/corrupt`). Pre-tokenized ids outside [0, vocab_size) are skipped by the pipeline (`skipped/bad_token_ids`).
Documents longer than the pipeline's `max_doc_chars` are split later (pipeline.py). A missing path or a source with
no documents is a ValueError naming it, raised when the pipeline is made.
"""
import bisect
import functools
import glob as _glob
import json
import mmap
import os

import numpy as np
from etils import epath

from ettin_jax.data import mds

_BINARY_PROBE = 8192


def resolve_path(path: str, base_dirs=()) -> list:
    """Expands a file, folder or glob into existing paths; tries `base_dirs` for relative paths not found as given."""
    path = os.fspath(path)
    candidates = [path]
    if "://" not in path and not os.path.isabs(path):
        candidates += [os.path.join(b, path) for b in base_dirs]
    for cand in candidates:
        if any(c in cand for c in "*?["):
            hits = sorted(_glob.glob(cand, recursive=True)) if "://" not in cand else sorted(
                str(p) for p in epath.Path(cand.split("*")[0]).glob("*" + cand.split("*", 1)[1]))
            if hits:
                return hits
        elif epath.Path(cand).exists():
            return [cand]
    tried = ", ".join(repr(c) for c in dict.fromkeys(candidates))
    raise ValueError(f"data path {path!r} does not exist (tried {tried})")


def decode_text(raw: bytes, stats, *, check_binary: bool = True, where=None):
    """UTF-8 text of `raw`, or None (counted in stats, `where` naming it) if it is binary, not UTF-8, or empty."""
    if check_binary and b"\x00" in raw[:_BINARY_PROBE]:
        stats.skip("binary", where=where)
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.skip("non_utf8", where=where)
        return None
    if not text.strip():
        stats.skip("empty", where=where)
        return None
    return text


def _text_value(value, stats, where=None):
    if value is None:
        stats.skip("no_text", where=where)
        return None
    if isinstance(value, (bytes, np.bytes_)):
        return decode_text(bytes(value), stats, check_binary=False, where=where)
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO":
        return _text_value(value.item(), stats, where)
    if not isinstance(value, str):
        stats.skip("no_text", where=where)
        return None
    if not value.strip():
        stats.skip("empty", where=where)
        return None
    return value


class Source:
    """Random access to one source's documents: `len(src)`, `src.load(i, stats) -> dict | None`."""

    name: str

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int, stats):
        """Document i as {source, doc_id, text} or {source, doc_id, input_ids}; None if it is skipped."""
        raise NotImplementedError


class JsonlSource(Source):
    """JSON Lines: one document per non-empty line; line offsets are indexed once (files are memory-mapped)."""

    def __init__(self, name, paths, text_field="text", id_field="id", stats=None):
        self.name, self.text_field, self.id_field = name, text_field, id_field
        self.files, self.starts, self.ends, self.cumulative = [], [], [], [0]
        for p in _expand_files(paths, (".jsonl", ".json")):
            data = _map_file(p)
            newlines = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n"))
            starts = np.concatenate([[0], newlines + 1]).astype(np.int64)
            ends = np.concatenate([newlines, [len(data)]]).astype(np.int64)
            nonempty = (ends - starts) > 0
            if len(data) and data[-1:] == b"\n":
                nonempty[-1] = False  # the empty "line" after the final newline is no document
            n_empty = int((~nonempty).sum()) - (1 if len(data) and data[-1:] == b"\n" else 0)
            if stats is not None and n_empty:
                stats.skip("empty", n_empty)
            self.files.append((p, data))
            self.starts.append(starts[nonempty])
            self.ends.append(ends[nonempty])
            self.cumulative.append(self.cumulative[-1] + int(nonempty.sum()))

    def __len__(self):
        return self.cumulative[-1]

    def load(self, i, stats):
        f = bisect.bisect_right(self.cumulative, i) - 1
        j = i - self.cumulative[f]
        path, data = self.files[f]
        raw = bytes(data[self.starts[f][j]:self.ends[f][j]])
        where = f"{path} document {j}"
        text = decode_text(raw, stats, where=where)
        if text is None:
            return None
        try:
            obj = json.loads(text)
        except ValueError:
            stats.skip("bad_json", where=where)
            return None
        if not isinstance(obj, dict):
            stats.skip("bad_json", where=where)
            return None
        text = _text_value(obj.get(self.text_field), stats, where)
        if text is None:
            return None
        doc_id = obj.get(self.id_field) if self.id_field else None
        return {"source": self.name, "doc_id": str(doc_id) if doc_id is not None else f"{path}:{j}", "text": text}


class TextSource(Source):
    """Plain text: one document per file."""

    def __init__(self, name, paths):
        self.name = name
        self.files = _expand_files(paths, None)
        self.roots = [os.path.dirname(p.rstrip("/")) for p in paths]

    def __len__(self):
        return len(self.files)

    def load(self, i, stats):
        path = self.files[i]
        try:
            raw = epath.Path(path).read_bytes()
        except OSError as e:  # gone or unreadable since the source was opened
            stats.skip("unreadable", where=f"{path} ({e.strerror or e})")
            return None
        text = decode_text(raw, stats, where=path)
        if text is None:
            return None
        return {"source": self.name, "doc_id": path, "text": text}


class ParquetSource(Source):
    """Parquet: one document per row; row groups are read on demand (the last one is cached)."""

    def __init__(self, name, paths, text_field="text", id_field="id"):
        import pyarrow.parquet as pq
        self.name, self.text_field, self.id_field = name, text_field, id_field
        self.groups, self.cumulative = [], [0]  # (file, row group)
        for p in _expand_files(paths, (".parquet",)):
            try:
                meta = pq.ParquetFile(p).metadata
            except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
                raise ValueError(f"source {name!r}: {p} is not a readable parquet file "
                                 f"({str(e).splitlines()[0]})") from None
            if text_field not in meta.schema.names:
                raise ValueError(f"source {name!r}: parquet file {p} has no column {text_field!r} "
                                 f"(columns: {meta.schema.names})")
            for g in range(meta.num_row_groups):
                self.groups.append((p, g, id_field in meta.schema.names))
                self.cumulative.append(self.cumulative[-1] + meta.row_group(g).num_rows)

    def __len__(self):
        return self.cumulative[-1]

    @functools.lru_cache(maxsize=2)
    def _group(self, k):
        import pyarrow
        import pyarrow.parquet as pq
        path, g, has_id = self.groups[k]
        cols = [self.text_field] + ([self.id_field] if has_id else [])
        try:
            table = pq.ParquetFile(path).read_row_group(g, columns=cols)
            ids = table.column(self.id_field).to_pylist() if has_id else None
            return table.column(self.text_field).to_pylist(), ids
        except (pyarrow.ArrowException, OSError, UnicodeDecodeError) as e:
            raise ValueError(f"source {self.name!r}: parquet file {path} row group {g} cannot be read "
                             f"({str(e).splitlines()[0]}): the file is corrupt") from None

    def load(self, i, stats):
        k = bisect.bisect_right(self.cumulative, i) - 1
        j = i - self.cumulative[k]
        texts, ids = self._group(k)
        text = _text_value(texts[j], stats, f"{self.groups[k][0]} row group {self.groups[k][1]} row {j}")
        if text is None:
            return None
        doc_id = ids[j] if ids is not None and ids[j] is not None else f"{self.groups[k][0]}:{i - self.cumulative[0]}"
        return {"source": self.name, "doc_id": str(doc_id), "text": text}


class TfdsSource(Source):
    """A TFDS dataset read through `tfds.data_source` (random access over ArrayRecord, no TensorFlow)."""

    def __init__(self, name, dataset, split, data_dir=None, text_field="text", id_field="id"):
        import tensorflow_datasets as tfds
        self.name, self.text_field, self.id_field = name, text_field, id_field
        self.dataset, self.split = dataset, split
        try:
            self.ds = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises several types for "not prepared"
            raise ValueError(f"source {name!r}: TFDS dataset {dataset!r} split {split!r} cannot be opened from "
                             f"data_dir={data_dir!r}: {e}") from e

    def __len__(self):
        return len(self.ds)

    def load(self, i, stats):
        try:
            ex = self.ds[i]
        except (OSError, ValueError, RuntimeError, IndexError) as e:  # a corrupt or missing ArrayRecord file
            raise ValueError(f"source {self.name!r}: TFDS {self.dataset}/{self.split} example {i} cannot be read "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        text = _text_value(ex.get(self.text_field), stats, f"TFDS {self.dataset}/{self.split} example {i}")
        if text is None:
            return None
        doc_id = ex.get(self.id_field) if self.id_field else None
        if isinstance(doc_id, (bytes, np.bytes_)):
            doc_id = bytes(doc_id).decode("utf-8", "replace")
        return {"source": self.name, "doc_id": str(doc_id) if doc_id is not None else f"{self.dataset}/{self.split}/{i}",
                "text": text}


class MdsSource(Source):
    """Ettin's pre-tokenized MDS pools: `input_ids` (uint32) and `id` columns; specials are stripped at chunking.

    A shard that fails its hash or layout check, or a sample that cannot be decoded, raises mds.MdsError (one line
    naming the file) or, with `on_bad_sample="skip"`, is skipped and counted as `skipped/corrupt`.
    """

    def __init__(self, name, paths, id_field="id", verify_hashes=True, on_bad_sample="error"):
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"data.on_bad_sample={on_bad_sample!r}; expected 'error' or 'skip'")
        self.name, self.id_field, self.on_bad_sample = name, id_field, on_bad_sample
        folders = []
        for p in paths:
            root = epath.Path(p)
            if (root / "index.json").exists():
                folders.append(root)
            else:
                folders += sorted({epath.Path(os.path.dirname(f)) for f in walk_files(p) if f.endswith("/index.json")})
        if not folders:
            raise ValueError(f"source {name!r}: no index.json under {paths}")
        self.reader = mds.MdsReader(folders, verify_hashes=verify_hashes)

    def __len__(self):
        return len(self.reader)

    def load(self, i, stats):
        try:
            sample = self.reader[i]
        except mds.MdsError as e:
            if self.on_bad_sample != "skip":
                raise
            stats.skip("corrupt", where=f"{self.reader.where(i)}: {e}")
            return None
        ids = sample.get("input_ids")
        if ids is None or len(ids) == 0:
            stats.skip("empty", where=self.reader.where(i))
            return None
        doc_id = sample.get(self.id_field, f"{self.name}:{i}")
        return {"source": self.name, "doc_id": str(doc_id), "input_ids": np.asarray(ids).reshape(-1),
                "where": self.reader.where(i)}


def _map_file(path):
    p = epath.Path(path)
    if "://" not in os.fspath(path):
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return b""
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return p.read_bytes()


def walk_files(root) -> list:
    """Every file under `root`, recursively, sorted (epath's glob refuses `**` on some filesystems)."""
    out, todo = [], [epath.Path(root)]
    while todo:
        for child in todo.pop().iterdir():
            if child.is_dir():
                todo.append(child)
            else:
                out.append(str(child))
    return sorted(out)


def _expand_files(paths, suffixes):
    files = []
    for p in paths:
        ep = epath.Path(p)
        if ep.is_dir():
            found = walk_files(p)
            if suffixes:
                found = [f for f in found if f.endswith(suffixes)]
            files += found
        else:
            files.append(str(p))
    return files


def _tfds(name, spec, base_dirs, stats, opts):
    data_dir = spec.get("data_dir")
    if data_dir:
        data_dir = resolve_path(data_dir, base_dirs)[0]
    return TfdsSource(name, spec["path"], spec.get("split", "train"), data_dir, spec.get("text_field", "text"),
                      spec.get("id_field", "id"))


# format -> opener(name, spec, base_dirs, stats, opts) -> Source; opts holds the data config's verify_hashes and
# on_bad_sample. A new source is a Source subclass and one entry here.
FORMATS = {
    "jsonl": lambda name, spec, base_dirs, stats, opts: JsonlSource(
        name, resolve_path(spec["path"], base_dirs), spec.get("text_field", "text"), spec.get("id_field", "id"),
        stats),
    "text": lambda name, spec, base_dirs, stats, opts: TextSource(name, resolve_path(spec["path"], base_dirs)),
    "parquet": lambda name, spec, base_dirs, stats, opts: ParquetSource(
        name, resolve_path(spec["path"], base_dirs), spec.get("text_field", "text"), spec.get("id_field", "id")),
    "tfds": _tfds,
    "mds": lambda name, spec, base_dirs, stats, opts: MdsSource(
        name, resolve_path(spec["path"], base_dirs), spec.get("id_field", "id"), **opts),
}


def open_source(spec, base_dirs=(), stats=None, *, verify_hashes=True, on_bad_sample="error") -> Source:
    """Opens the source described by one entry of `data_config.sources` (checks the path exists).

    `verify_hashes` and `on_bad_sample` are the data config's (they apply to MDS shards).
    """
    fmt = spec.get("format", "jsonl")
    name = spec["name"]
    if fmt not in FORMATS:
        raise ValueError(f"source {name!r}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return FORMATS[fmt](name, spec, base_dirs, stats, dict(verify_hashes=verify_hashes, on_bad_sample=on_bad_sample))
