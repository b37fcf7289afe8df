"""Counters of what the data pipeline read, skipped, split, dropped and packed; the trainer logs `as_dict()`."""
import collections
import threading

# Skipped documents named in the log and in data_stats.json (`skipped_examples`): the first few of a run.
MAX_EXAMPLES = 10


def _warn(msg):
    from absl import logging
    logging.warning(msg)


class DataStats:
    """Thread-safe counters for one pipeline on one host; part of the data iterator's checkpointed state.

    Fields of `as_dict()`:
      documents_read        documents taken from the mixture by the streams (skipped ones included; a document
                            read again in a later epoch counts again)
      documents_used        documents that gave at least one chunk
      skipped/<reason>      documents skipped, by reason: empty, non_utf8, binary, bad_json, no_text, unreadable
                            (text sources),
                            corrupt (an MDS shard or sample that failed its check, with on_bad_sample=skip),
                            bad_token_ids (pre-tokenized ids outside [0, vocab_size))
      skipped               all of them
      skipped_per_source/<name>   documents skipped, by source
      skipped_examples      the first few skipped documents, "<reason>: <file and sample>" (also logged)
      documents_split       documents longer than `max_doc_chars` that were split into parts before tokenizing
      chunks                chunks made (each [CLS] ... [SEP])
      chunks_dropped        chunks under `min_chunk_tokens` that were dropped
      tokens                tokens in rows handed out (non-pad)
      pad_tokens            padding tokens in rows handed out
      rows                  rows handed out
      packing_efficiency    tokens / (tokens + pad_tokens)
      per_source/<name>     documents used from each source
    """

    def __init__(self, log=_warn):
        self._lock = threading.Lock()
        self._c = collections.Counter()
        self._examples = []
        self._log = log

    def add(self, key: str, n: int = 1):
        with self._lock:
            self._c[key] += n

    def skip(self, reason: str, n: int = 1, *, source=None, where=None):
        """Counts `n` skipped documents; the first MAX_EXAMPLES with a `where` are logged and kept."""
        with self._lock:
            self._c[f"skipped/{reason}"] += n
            if source is not None:
                self._c[f"skipped_per_source/{source}"] += n
            if where is not None and len(self._examples) < MAX_EXAMPLES:
                example = f"{reason}: {where}" if source is None else f"{reason}: {where} (source {source!r})"
                self._examples.append(example)
                if self._log:
                    self._log(f"data: skipped a document, {example}")

    def skipped(self) -> int:
        with self._lock:
            return sum(v for k, v in self._c.items() if k.startswith("skipped/"))

    def __getitem__(self, key):
        with self._lock:
            return self._c[key]

    def get_state(self) -> dict:
        """The counters as JSON (saved with the data iterator, so that data_stats.json survives a resume)."""
        with self._lock:
            return {"counts": dict(self._c), "examples": list(self._examples)}

    def set_state(self, state: dict):
        with self._lock:
            self._c = collections.Counter({k: int(v) for k, v in state["counts"].items()})
            self._examples = list(state.get("examples", []))

    def as_dict(self) -> dict:
        with self._lock:
            d = dict(self._c)
            examples = list(self._examples)
        for key in ("documents_read", "documents_used", "documents_split", "chunks", "chunks_dropped",
                    "tokens", "pad_tokens", "rows"):
            d.setdefault(key, 0)
        d["skipped"] = sum(v for k, v in d.items() if k.startswith("skipped/"))
        total = d["tokens"] + d["pad_tokens"]
        d["packing_efficiency"] = d["tokens"] / total if total else 0.0
        d["skipped_examples"] = examples
        return dict(sorted(d.items()))
