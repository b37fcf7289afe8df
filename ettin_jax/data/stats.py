"""Counters of what the data pipeline read, skipped, split, dropped and packed; the trainer logs `as_dict()`."""
import collections
import threading


class DataStats:
    """Thread-safe counters for one pipeline on one host (counts since the pipeline was made, not checkpointed).

    Fields of `as_dict()`:
      documents_read        documents loaded from a source (before any skip)
      documents_used        documents that gave at least one chunk
      skipped/<reason>      documents skipped, by reason: empty, non_utf8, binary, bad_json, no_text, too_short
      documents_split       documents longer than `max_doc_chars` that were split into parts before tokenizing
      chunks                chunks made (each [CLS] ... [SEP])
      chunks_dropped        chunks under `min_chunk_tokens` that were dropped
      tokens                tokens in rows handed out (non-pad)
      pad_tokens            padding tokens in rows handed out
      rows                  rows handed out
      packing_efficiency    tokens / (tokens + pad_tokens)
      per_source/<name>     documents used from each source
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._c = collections.Counter()

    def add(self, key: str, n: int = 1):
        with self._lock:
            self._c[key] += n

    def skip(self, reason: str, n: int = 1):
        self.add(f"skipped/{reason}", n)

    def __getitem__(self, key):
        with self._lock:
            return self._c[key]

    def as_dict(self) -> dict:
        with self._lock:
            d = dict(self._c)
        for key in ("documents_read", "documents_used", "documents_split", "chunks", "chunks_dropped",
                    "tokens", "pad_tokens", "rows"):
            d.setdefault(key, 0)
        d["skipped"] = sum(v for k, v in d.items() if k.startswith("skipped/"))
        total = d["tokens"] + d["pad_tokens"]
        d["packing_efficiency"] = d["tokens"] / total if total else 0.0
        return dict(sorted(d.items()))
