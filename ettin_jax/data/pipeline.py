"""The data pipeline: sources -> weighted mixture -> tokenize -> Ettin chunking -> packing -> batches (+ MLM).

Determinism design. The global batch of step N is a pure function of (data config, seed, seq_len, global batch
size, N), whatever the host count or worker count:

* Document order. Each source k is a Grain `MapDataset.range(n_k).shuffle(seed_k).repeat()` (a fresh permutation
  per epoch, computed per index, never materialised) and `MapDataset.mix` interleaves the sources by weight
  (weights count documents). This is one infinite, random-access sequence of (source, document) references.
* Streams. That sequence is dealt round-robin into a FIXED number `num_streams` (S) of independent packing streams:
  stream s takes documents s, s + S, s + 2S, ... Each stream tokenizes, chunks and packs its own documents into
  rows, sequentially and on its own.
* Rows. The B rows of a step and the S streams are cut into G = gcd(B, S) groups, in order: group j is rows
  [j * B/G, (j + 1) * B/G) of every step and streams [j * S/G, (j + 1) * S/G). Within a group the rows, counted
  over steps (q = N * B/G + i for row i of the group at step N), are dealt round-robin to its streams: row q is row
  q // (S/G) of stream j * S/G + q % (S/G). So with S dividing B, stream s makes B/S contiguous rows of every step;
  with B dividing S, each row position takes S/B streams in turn. Host h of H holds rows [h * B/H, (h + 1) * B/H)
  of every step, which are whole groups, and runs only streams [h * S/H, (h + 1) * S/H): it reads and tokenizes
  only its own documents, 1/H of the work. That needs H to divide S and B (checked before training). Neither the
  host count nor the worker count enters the mapping, so 1, 4 or 8 hosts see the same global batch.
* MLM masks are drawn per row from a Philox generator keyed by (seed, N, r) (masking.py).

State. A stream's state is its document cursor, the chunk it is in, the rows it has handed out and its packer's
open rows as chunk keys (document position, part, chunk index) and, inside a split document, where its parts start
in the document's tokens — JSON, a few KB per stream; documents are re-read and re-tokenized on restore. The
iterator's state is {version, step, this host's streams, fingerprint, shard, stats}: the counts (DataStats) are
made when a stream reaches what they count, never when it is loaded ahead, so a restored run counts on exactly as an
uninterrupted one (data_stats.json survives a resume); `iterator(start_step=N)` without a
state replays this host's streams from the start (cost: tokenizing this host's share of everything up to step N),
which is how a run resumes on a different host count.
"""
import collections
import dataclasses
import hashlib
import json
import math
import os

import grain
import numpy as np

from ettin_jax.data import chunking
from ettin_jax.data import masking
from ettin_jax.data import packing
from ettin_jax.data import replay as replay_lib
from ettin_jax.data import sources as sources_lib
from ettin_jax.data.stats import DataStats

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# 2: rows map to streams in gcd(B, S) groups (version 1 dealt global rows round-robin) and split-document offsets.
STATE_VERSION = 2
# A stream that reads this many unusable documents in a row stops with an error instead of looping.
_MAX_CONSECUTIVE_BAD = 10_000
# data.max_skip_fraction is checked once this many documents were read (a few bad ones at the start say little).
_SKIP_CHECK_MIN_DOCS = 200
_PROBE_DOCS = 32
_MISSING = object()


def base_dirs():
    """Where relative data paths are looked for: the CWD first, then the repository root."""
    return (os.getcwd(), REPO_ROOT)


def row_hash(tokens_row: np.ndarray) -> str:
    """Short sha256 of one row's tokens (int32 little-endian)."""
    return hashlib.sha256(np.ascontiguousarray(tokens_row, "<i4").tobytes()).hexdigest()[:16]


def batch_hash(row_hashes) -> str:
    """The batch hash: sha256 over the row hashes in row order (so hosts' parts combine into the global hash)."""
    return hashlib.sha256("".join(row_hashes).encode()).hexdigest()[:16]


@dataclasses.dataclass
class _Skipped:
    """A document the stream skips: its source and the (reason, where) pairs counted when the stream reaches it."""
    source: str
    skips: list


class _Skips:
    """Collects a source's `skip` calls for one document (counted only when its stream reaches the document, so the
    counts are a function of the streams' progress: the same after a resume as in one uninterrupted run)."""

    def __init__(self):
        self.skips = []

    def skip(self, reason, n=1, *, where=None):
        self.skips += [(reason, where)] * n


@dataclasses.dataclass
class _Unit:
    """One tokenized document (or part of a split document) and its chunk spans."""
    source: str
    doc_id: str
    tokens: np.ndarray
    spans: list
    offset: int  # where this part's tokens start in the document's tokens (0 unless the document was split)
    dropped: int  # chunks dropped (under min_chunk_tokens)


class _Stream:
    """One packing stream: documents s, s + S, ... of the mixture, chunked and packed in order."""

    def __init__(self, pipe: "Pipeline", s: int):
        self.p, self.s = pipe, s
        self.refs = pipe._doc_refs[s::pipe.num_streams]
        self.doc_pos, self.cur, self.rows_out = 0, None, 0
        self.packer = packing.BestFitPacker(pipe.seq_len, pipe.cfg.num_open_rows, pipe.cfg.min_chunk_tokens,
                                            enabled=pipe.cfg.packing, max_wait=int(pipe.cfg.max_row_wait))
        self.docs = {}   # doc_pos -> (source, doc_id, parts: str to tokenize, or int32 tokens), or _Skipped
        self.units = {}  # (doc_pos, part) -> _Unit
        self.part_offsets = {}  # (doc_pos, part) -> token offset of that part of a split document

    # -- documents -------------------------------------------------------------------------------------------
    def _doc(self, dp):
        if dp not in self.docs:
            self._load_window(dp)
        return self.docs[dp]

    def _load_window(self, dp):
        """Loads documents dp .. dp + lookahead - 1, tokenizing the uncached texts in one batch (Rust, threaded)."""
        p = self.p
        window = [d for d in range(dp, dp + max(1, p.cfg.tokenize_lookahead)) if d not in self.docs]
        to_encode = []
        for d in window:
            k, i = self.refs[d]
            k, i = int(k), int(i)
            cached = p._cache.get((k, i), _MISSING)
            if cached is not _MISSING:
                self.docs[d] = cached
                continue
            skips = _Skips()
            doc = p.sources[k].load(i, skips)
            if doc is not None and "input_ids" in doc:
                doc = p._checked_ids(doc, skips)
            if doc is None:
                self.docs[d] = p._cache_put((k, i), _Skipped(p.sources[k].name, skips.skips), 0)
                continue
            if "input_ids" in doc:
                ids = np.asarray(doc["input_ids"], np.int64)
                # Pre-tokenized pools may carry their own [CLS]/[SEP]; chunking adds them back.
                if len(ids) and ids[0] == p.tokenizer.cls_id:
                    ids = ids[1:]
                if len(ids) and ids[-1] == p.tokenizer.sep_id:
                    ids = ids[:-1]
                self.docs[d] = (doc["source"], doc["doc_id"], [ids.astype(np.int32)])
                continue
            parts = _split_text(doc["text"], p.cfg.max_doc_chars)
            self.docs[d] = (doc["source"], doc["doc_id"], parts)
            if len(parts) == 1:  # split documents are tokenized part by part, never cached
                to_encode.append((d, (k, i), doc["text"]))
        if to_encode:
            encoded = p.tokenizer.encode_batch([t for _, _, t in to_encode])
            for (d, key, _), ids in zip(to_encode, encoded):
                ids = np.asarray(ids, np.int32)
                self.docs[d] = p._cache_put(key, (self.docs[d][0], self.docs[d][1], [ids]), len(ids))

    def _unit(self, dp, part):
        key = (dp, part)
        if key not in self.units:
            source, doc_id, parts = self._doc(dp)
            tokens = parts[part]
            if isinstance(tokens, str):
                tokens = np.asarray(self.p.tokenizer.encode(tokens), np.int32)
            spans, dropped = chunking.chunk_spans(len(tokens), self.p.seq_len, self.p.cfg.min_chunk_tokens,
                                                  self.p.cfg.backfill_tail)
            offset = 0
            if len(parts) > 1:
                doc_id = f"{doc_id}#part{part}"
                offset = self._part_offset(dp, part)
                self.part_offsets[dp, part + 1] = offset + len(tokens)
            self.units[key] = _Unit(source, doc_id, tokens, spans, offset, dropped)
        return self.units[key]

    def _part_offset(self, dp, part):
        """Token offset of a split document's part: the parts before it are tokenized only if no state says it."""
        if part == 0:
            return 0
        if (dp, part) not in self.part_offsets:
            before = self._doc(dp)[2][part - 1]
            n = len(self.p.tokenizer.encode(before)) if isinstance(before, str) else len(before)
            self.part_offsets[dp, part] = self._part_offset(dp, part - 1) + n
        return self.part_offsets[dp, part]

    def _chunk_len(self, key):
        start, end = self._unit(key[0], key[1]).spans[key[2]]
        return end - start + 2

    # -- rows ------------------------------------------------------------------------------------------------
    def _next_keys(self):
        # Every count is made when the stream reaches what it counts (not when it is loaded ahead), so the counts
        # are a function of the streams' progress and survive a resume exactly (DataStats in the iterator state).
        stats = self.p._stats
        bad = 0
        while True:
            row = self.packer.pop()
            if row is not None:
                return row
            if self.cur is None:
                dp = self.doc_pos
                self.doc_pos += 1
                doc = self._doc(dp)
                stats.add("documents_read")
                if isinstance(doc, _Skipped):
                    for reason, where in doc.skips:
                        stats.skip(reason, source=doc.source, where=where)
                    bad += 1
                    if bad >= _MAX_CONSECUTIVE_BAD:
                        raise RuntimeError(f"data stream {self.s}: {bad} unusable documents in a row; see stats "
                                           f"{self.p.stats()}")
                    continue
                if len(doc[2]) > 1:
                    stats.add("documents_split")
                self.cur = [dp, 0, 0]
            dp, part, ci = self.cur
            unit = self._unit(dp, part)
            if ci == 0:  # reached once per unit (a saved state is never at ci == 0)
                stats.add("chunks", len(unit.spans))
                stats.add("chunks_dropped", unit.dropped)
            if ci == 0 and unit.spans:
                bad = 0
                if part == 0:
                    stats.add("documents_used")
                    stats.add(f"per_source/{unit.source}")
            if ci < len(unit.spans):
                self.packer.add((dp, part, ci), unit.spans[ci][1] - unit.spans[ci][0] + 2)
                self.cur[2] += 1
            elif part + 1 < len(self.docs[dp][2]):
                self.units.pop((dp, part), None)  # parts of a split document are tokenized one at a time
                self.cur = [dp, part + 1, 0]
            else:
                self.cur = None

    def next_row(self):
        """The stream's next row: (list of chunk int32 arrays, list of provenance pieces)."""
        keys = self._next_keys()
        chunks, pieces = [], []
        for dp, part, ci in keys:
            unit = self._unit(dp, part)
            start, end = unit.spans[ci]
            chunks.append(chunking.make_chunk(unit.tokens, start, end, self.p.tokenizer.cls_id,
                                              self.p.tokenizer.sep_id))
            pieces.append([unit.source, unit.doc_id, int(unit.offset + start), int(unit.offset + end)])
        self.rows_out += 1
        self._evict()
        return chunks, pieces

    def row(self, k):
        """Row k of this stream; rows before it are made and dropped (only when starting at a step without state)."""
        if k < self.rows_out:
            raise RuntimeError(f"stream {self.s}: row {k} asked after row {self.rows_out - 1} was handed out")
        while self.rows_out < k:
            self._next_keys()
            self.rows_out += 1
            self._evict()
        return self.next_row()

    def _evict(self):
        if len(self.docs) < 4 * max(1, self.p.cfg.tokenize_lookahead):
            return
        live = [k[0] for _, keys, _ in self.packer.open for k in keys] + [k[0] for keys in self.packer.ready
                                                                        for k in keys]
        if self.cur is not None:
            live.append(self.cur[0])
        low = min(live, default=self.doc_pos)
        for d in [d for d in self.docs if d < low]:
            del self.docs[d]
        for key in [key for key in self.units if key[0] < low]:
            del self.units[key]
        for key in [key for key in self.part_offsets if key[0] < low]:
            del self.part_offsets[key]

    def get_state(self):
        return {"doc_pos": self.doc_pos, "cur": self.cur, "rows_out": self.rows_out,
                "packer": self.packer.get_state(),
                "part_offsets": [[dp, part, off] for (dp, part), off in sorted(self.part_offsets.items())]}

    def set_state(self, state):
        self.doc_pos, self.rows_out = int(state["doc_pos"]), int(state["rows_out"])
        self.cur = list(state["cur"]) if state["cur"] is not None else None
        self.docs, self.units = {}, {}
        self.part_offsets = {(int(dp), int(part)): int(off) for dp, part, off in state.get("part_offsets", [])}
        self.packer.set_state(state["packer"], self._chunk_len)


def _split_text(text: str, max_chars: int):
    """Splits a text longer than max_chars into parts of at most max_chars, at whitespace where there is some."""
    if max_chars <= 0 or len(text) <= max_chars:
        return [text]
    parts, start = [], 0
    while start < len(text):
        end = min(len(text), start + max_chars)
        if end < len(text):
            cut = max(text.rfind(" ", start + max_chars // 2, end), text.rfind("\n", start + max_chars // 2, end))
            if cut > start:
                end = cut + 1
        parts.append(text[start:end])
        start = end
    return parts


class BatchIterator(grain.DatasetIterator):
    """Yields the batch dicts of steps start_step, start_step + 1, ...; `get_state()`/`set_state()` are JSON.

    Save/restore it with Orbax through `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`.
    """

    def __init__(self, pipe: "Pipeline", start_step: int = 0):
        super().__init__()
        self._pipe = pipe
        self._step = int(start_step)
        self._streams = {}

    def __next__(self) -> dict:
        batch = self._pipe._batch(self._step, self._streams)
        self._step += 1
        return batch

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "step": self._step, "fingerprint": self._pipe.fingerprint,
                "shard": [self._pipe.shard_index, self._pipe.shard_count],
                "streams": {str(s): st.get_state() for s, st in sorted(self._streams.items())},
                "stats": self._pipe._stats.get_state()}

    def set_state(self, state: dict):
        pipe = self._pipe
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')}, expected {STATE_VERSION} (saved "
                             f"by another version of ettin_jax.data); use Pipeline.iterator(start_step="
                             f"{state.get('step')}) to replay the stream to that step")
        if state["fingerprint"] != pipe.fingerprint:
            raise ValueError("data iterator state was saved with a different data config, seed, seq_len or batch "
                             f"size (fingerprint {state['fingerprint']} != {pipe.fingerprint}); start fresh or "
                             "use Pipeline.iterator(start_step=N)")
        if list(state["shard"]) != [pipe.shard_index, pipe.shard_count]:
            raise ValueError(f"data iterator state belongs to shard {state['shard']}, not "
                             f"{[pipe.shard_index, pipe.shard_count]}; on a new topology use "
                             f"Pipeline.iterator(start_step={state['step']}) (same batches, replayed)")
        self._step = int(state["step"])
        self._streams = {}
        for s, st in state["streams"].items():
            stream = _Stream(pipe, int(s))
            stream.set_state(st)
            self._streams[int(s)] = stream
        if "stats" in state:  # the counts go on from where they were (older states lack them: counted afresh)
            pipe._stats.set_state(state["stats"])

    def __str__(self):
        return f"ettin_jax.data.BatchIterator(step={self._step})"


class _BatchDataset(grain.IterDataset):
    """An IterDataset over the batches from `start_step`, so Grain's prefetch can wrap it."""

    def __init__(self, pipe, start_step):
        super().__init__()
        self._pipe, self._start_step = pipe, start_step

    def __iter__(self):
        return BatchIterator(self._pipe, self._start_step)

    def __str__(self):
        return "ettin_jax.data._BatchDataset"


class Pipeline:
    """A validated data pipeline for one host; see `make_pipeline`."""

    def __init__(self, cfg, *, seq_len, global_batch_size, seed, mlm_rate, shard_index, shard_count, tokenizer):
        self.cfg = cfg
        self.seq_len, self.global_batch_size = int(seq_len), int(global_batch_size)
        self.seed, self.mlm_rate = int(seed), float(mlm_rate)
        self.shard_index, self.shard_count = int(shard_index), int(shard_count)
        self.host_batch_size = self.global_batch_size // self.shard_count
        self.num_streams = int(cfg.num_streams)
        # Rows and streams split into gcd(B, S) groups (the module docstring); a host holds whole groups.
        groups = math.gcd(self.global_batch_size, self.num_streams)
        self.rows_per_group, self.streams_per_group = self.global_batch_size // groups, self.num_streams // groups
        self.tokenizer = tokenizer
        self._stats = DataStats()
        # Tokenized documents, shared by all streams and iterators of this pipeline (FIFO within a token budget),
        # so later epochs and restores do not tokenize again.
        self._cache, self._cache_tokens = collections.OrderedDict(), 0
        special = dict(tokenizer.special_ids)
        self._special = sorted(set(int(v) for v in special.values()))
        self.mlm_slots = masking.num_mlm_slots(self.mlm_rate, self.seq_len) if self.mlm_rate > 0 else 0
        config_for_fp = {k: v for k, v in _to_plain(cfg).items() if k not in (
            "num_workers", "tokenize_lookahead", "token_cache_tokens", "verify_hashes", "on_bad_sample",
            "max_skip_fraction")}
        self.fingerprint = hashlib.sha256(json.dumps(
            [config_for_fp, self.seq_len, self.global_batch_size, self.seed, self.num_streams],
            sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.replay = None
        if cfg.replay_path:
            paths = sources_lib.resolve_path(cfg.replay_path, base_dirs())
            self.replay = replay_lib.ReplayReader(paths, int(cfg.replay_first_step))
            return
        self.sources, weights = [], []
        names = set()
        for spec in cfg.sources:
            name = spec["name"]
            if name in names:
                raise ValueError(f"data source name {name!r} is used twice")
            names.add(name)
            weight = float(spec.get("weight", 1.0))
            if not weight > 0:
                raise ValueError(f"data source {name!r}: mixture weight must be > 0, got {weight}")
            src = sources_lib.open_source(spec, base_dirs(), self._stats, verify_hashes=bool(cfg.verify_hashes),
                                          on_bad_sample=cfg.on_bad_sample)
            if len(src) == 0:
                raise ValueError(f"data source {name!r} ({spec.get('path')}) has no documents")
            self._probe(src, spec)
            self.sources.append(src)
            weights.append(weight)
        if not self.sources:
            raise ValueError("data config has no sources (data_config.sources is empty)")
        mixed = []
        for k, src in enumerate(self.sources):
            ds = grain.MapDataset.range(len(src))
            if cfg.shuffle:
                ds = ds.shuffle(seed=int(np.random.SeedSequence([self.seed, k]).generate_state(1)[0]))
            mixed.append(ds.repeat().map(_TagSource(k)))
        self._doc_refs = grain.MapDataset.mix(mixed, weights) if len(mixed) > 1 else mixed[0]

    def _probe(self, src, spec):
        """Fails early when a source's first documents are all unusable (wrong field, binary, ...)."""
        probe_stats = DataStats(log=None)
        for i in range(min(len(src), _PROBE_DOCS)):
            if src.load(i, probe_stats) is not None:
                return
        d = probe_stats.as_dict()
        reasons = {k: v for k, v in d.items() if k.startswith("skipped/")}
        first = f"; first: {d['skipped_examples'][0]}" if d["skipped_examples"] else ""
        raise ValueError(f"data source {spec['name']!r} ({spec.get('path')}): none of its first "
                         f"{min(len(src), _PROBE_DOCS)} documents is usable ({reasons}{first}); "
                         f"check format/text_field")

    def _cache_put(self, key, entry, n_tokens):
        self._cache[key] = entry
        self._cache_tokens += n_tokens
        while self._cache_tokens > self.cfg.token_cache_tokens and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_tokens -= len(old[2][0]) if not isinstance(old, _Skipped) else 0
        return entry

    def _checked_ids(self, doc, skips):
        """`doc` if its pre-tokenized ids are all in [0, vocab_size); else None, counted as bad_token_ids."""
        ids = np.asarray(doc["input_ids"])
        vocab = self.tokenizer.vocab_size
        if ids.size and (ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= vocab):
            lo, hi = (ids.min(), ids.max()) if ids.dtype.kind in "iuf" else ("?", "?")
            skips.skip("bad_token_ids", where=f"{doc.get('where', doc['doc_id'])} (id {doc['doc_id']!r}: ids "
                                              f"{lo}..{hi}, vocab_size {vocab})")
            return None
        return doc

    def _check_skip_fraction(self):
        """Stops the run when more than data.max_skip_fraction of the documents read were skipped."""
        read, skipped = self._stats["documents_read"], self._stats.skipped()
        limit = float(self.cfg.max_skip_fraction)
        if read >= _SKIP_CHECK_MIN_DOCS and skipped > limit * read:
            d = self.stats()
            reasons = {k: v for k, v in d.items() if k.startswith(("skipped/", "skipped_per_source/"))}
            raise ValueError(f"data: {skipped} of {read} documents skipped ({skipped / read:.1%} > "
                             f"data.max_skip_fraction={limit:g}): {reasons}; first: {d['skipped_examples'][:3]}. "
                             f"Fix or remove the bad input, or raise --config.data.max_skip_fraction")

    def stats(self) -> dict:
        """Counters since this pipeline was made (see DataStats for the fields)."""
        return self._stats.as_dict()

    def dataset(self, start_step: int = 0) -> grain.IterDataset:
        """A Grain IterDataset of the batches from start_step (with thread prefetch if num_workers > 0)."""
        ds = _BatchDataset(self, start_step)
        if self.cfg.num_workers > 0:
            ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=int(self.cfg.num_workers))
        return ds

    def iterator(self, start_step: int = 0):
        """The checkpointable iterator whose `next()` is the batch of start_step, then start_step + 1, ..."""
        return iter(self.dataset(start_step))

    # -- batches ---------------------------------------------------------------------------------------------
    def _rows(self, step, streams):
        b, first = self.host_batch_size, self.shard_index * self.host_batch_size
        if self.replay is not None:
            seqs = self.replay.rows(step)
            if len(seqs) != self.global_batch_size:
                raise ValueError(f"replay step {self.replay.first_step + step} has {len(seqs)} sequences, but "
                                 f"global_batch_size is {self.global_batch_size}")
            out = []
            vocab = self.tokenizer.vocab_size
            for r in range(first, first + b):
                seq = seqs[r]
                self._stats.add("documents_read")
                if len(seq) and (seq.min() < 0 or seq.max() >= vocab):
                    self._stats.skip("bad_token_ids", source="replay", where=(
                        f"replay step {self.replay.first_step + step} row {r} (ids {seq.min()}..{seq.max()}, "
                        f"vocab_size {vocab}); the row is left empty"))
                    seq = seq[:0]
                seq = seq[:np.flatnonzero(seq != self.tokenizer.pad_id).max() + 1] if (
                    seq != self.tokenizer.pad_id).any() else seq[:0]
                if len(seq) > self.seq_len:
                    raise ValueError(f"replay step {self.replay.first_step + step} row {r} has {len(seq)} tokens "
                                     f"> seq_len {self.seq_len}")
                out.append(([seq.astype(np.int32)], [["replay", f"step{self.replay.first_step + step}/row{r}",
                                                      0, len(seq)]]))
            return out
        out = []
        for r in range(first, first + b):
            s, k = self.stream_row(step, r)
            if s not in streams:
                streams[s] = _Stream(self, s)
            out.append(streams[s].row(k))
        return out

    def stream_row(self, step: int, r: int):
        """(stream, row of that stream) that row r of step `step`'s global batch comes from (module docstring)."""
        group, i = divmod(r, self.rows_per_group)
        q = step * self.rows_per_group + i
        return group * self.streams_per_group + q % self.streams_per_group, q // self.streams_per_group

    def _batch(self, step, streams):
        rows = self._rows(step, streams)
        b, t = len(rows), self.seq_len
        tokens = np.full((b, t), self.tokenizer.pad_id, np.int32)
        segment_ids = np.zeros((b, t), np.int32)
        positions = np.zeros((b, t), np.int32)
        prov_rows = []
        first = self.shard_index * self.host_batch_size
        for i, (chunks, pieces) in enumerate(rows):
            at = 0
            for j, chunk in enumerate(chunks):
                n = len(chunk)
                tokens[i, at:at + n] = chunk
                segment_ids[i, at:at + n] = j + 1
                positions[i, at:at + n] = np.arange(n, dtype=np.int32)
                at += n
            prov_rows.append({"row": first + i, "pieces": pieces, "hash": row_hash(tokens[i])})
        n_real = int((segment_ids > 0).sum())
        self._stats.add("rows", b)
        self._stats.add("tokens", n_real)
        self._stats.add("pad_tokens", b * t - n_real)
        self._check_skip_fraction()
        batch = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
        if self.mlm_rate > 0:
            batch.update(masking.mlm_mask(tokens, segment_ids, rate=self.mlm_rate, seed=self.seed, step=step,
                                          first_row=first, special_ids=self._special,
                                          mask_id=self.tokenizer.mask_id, vocab_size=self.tokenizer.vocab_size))
        batch["step"] = step
        batch["provenance"] = {"step": step, "shard_index": self.shard_index, "shard_count": self.shard_count,
                               "rows": prov_rows, "hash": batch_hash([r["hash"] for r in prov_rows])}
        return batch


class _TagSource:
    """Tags a document index with its source index (a picklable callable for MapDataset.map)."""

    def __init__(self, k):
        self.k = k

    def __call__(self, i):
        return (self.k, i)


def _to_plain(cfg):
    return json.loads(cfg.to_json_best_effort()) if hasattr(cfg, "to_json_best_effort") else dict(cfg)


def _check(cond, msg):
    if not cond:
        raise ValueError(msg)


def make_pipeline(data_config, *, seq_len: int, global_batch_size: int, seed: int, mlm_rate: float,
                  shard_index: int = 0, shard_count: int = 1, tokenizer=None) -> Pipeline:
    """Validates `data_config` and the run's shapes, opens every source, and returns this host's Pipeline.

    Raises ValueError, naming the offending value, before any training starts: missing paths, empty sources,
    weights <= 0, seq_len too short for chunking, a batch or `num_streams` not divisible by the host count, a
    tokenizer whose special ids differ from `data_config.special_ids`. `tokenizer` overrides `data_config.tokenizer`
    (tests).
    """
    cfg = data_config
    _check(int(seq_len) >= max(3, int(cfg.min_chunk_tokens)),
           f"seq_len={seq_len} is shorter than min_chunk_tokens={cfg.min_chunk_tokens}: every chunk would be dropped")
    _check(int(global_batch_size) > 0, f"global_batch_size must be > 0, got {global_batch_size}")
    _check(int(shard_count) > 0 and 0 <= int(shard_index) < int(shard_count),
           f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    _check(int(global_batch_size) % int(shard_count) == 0,
           f"global_batch_size={global_batch_size} is not divisible by shard_count={shard_count} (the host count); "
           f"set config.global_batch_size to a multiple of {shard_count}")
    _check(0.0 <= float(mlm_rate) < 1.0, f"mlm_rate must be in [0, 1), got {mlm_rate}")
    _check(int(cfg.num_streams) >= 1, f"num_streams must be >= 1, got {cfg.num_streams}")
    if not cfg.replay_path:
        s, h = int(cfg.num_streams), int(shard_count)
        _check(s % h == 0,
               f"shard_count={h} does not divide data.num_streams={s}: each host packs its own equal share of the "
               f"streams; set config.data.num_streams to a multiple of {h} (e.g. {s + (-s) % h}; a new value gives "
               f"other batches, so choose it for the largest host count the run will use)")
    _check(int(cfg.num_workers) >= 0, f"num_workers must be >= 0, got {cfg.num_workers}")
    _check(cfg.on_bad_sample in ("error", "skip"),
           f"data.on_bad_sample={cfg.on_bad_sample!r}; expected 'error' (refuse a corrupt shard) or 'skip'")
    _check(int(cfg.max_row_wait) >= 0, f"data.max_row_wait={cfg.max_row_wait} must be >= 0 (0: no bound)")
    _check(0.0 <= float(cfg.max_skip_fraction) <= 1.0,
           f"data.max_skip_fraction={cfg.max_skip_fraction} must be in [0, 1]")
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.tokenizer)
    expected = cfg.get("special_ids")
    if expected:
        actual = dict(tokenizer.special_ids)
        diff = {k: (v, actual.get(k)) for k, v in dict(expected).items() if actual.get(k) != v}
        _check(not diff, f"tokenizer {cfg.tokenizer!r} special ids differ from data_config.special_ids "
                         f"(name: (expected, actual)): {diff}")
    return Pipeline(cfg, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed, mlm_rate=mlm_rate,
                    shard_index=shard_index, shard_count=shard_count, tokenizer=tokenizer)


def load_tokenizer(path):
    """Loads the project tokenizer (ettin_jax.tokenizer) from a path relative to the CWD or the repository root."""
    try:
        from ettin_jax import tokenizer as tokenizer_lib
    except ImportError as e:
        raise ValueError("ettin_jax.tokenizer is not available; pass tokenizer= to make_pipeline") from e
    resolved = sources_lib.resolve_path(path, base_dirs())[0]
    return tokenizer_lib.load_tokenizer(resolved)
