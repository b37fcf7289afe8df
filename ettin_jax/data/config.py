"""The default data config: the bundled three-source corpus, Ettin's chunking, packing on.

Sources are listed in `sources`, each a dict {name, format, path, weight, text_field, id_field, split, data_dir};
weights count documents (not tokens) and need not sum to 1. Paths relative to the repository root work from any CWD.
"""
import ml_collections


def default_data_config() -> ml_collections.ConfigDict:
    """The demo data config (Ettin's Table 2 in miniature: prose, reference docs, code)."""
    c = ml_collections.ConfigDict()
    c.sources = [
        dict(name="austen", format="jsonl", path="data/corpus/austen.jsonl", weight=0.4),
        dict(name="python_docs", format="jsonl", path="data/corpus/python_docs.jsonl", weight=0.3),
        dict(name="python_stdlib", format="jsonl", path="data/corpus/python_stdlib.jsonl", weight=0.3),
    ]
    c.tokenizer = "data/tokenizer"
    c.special_ids = {}            # e.g. {"cls": 1, "sep": 2, ...} to insist on a tokenizer's special ids
    c.shuffle = True              # per-epoch document shuffle within each source
    c.packing = True              # False: one chunk per row, padded
    c.num_open_rows = 64          # packer pool size (more: denser rows, more reordering)
    c.max_row_wait = 256          # a row open while this many more chunks came is closed (padded): no chunk waits
                                  # longer than 2 * max_row_wait + 2 rows of its stream (packing.py); 0: no bound
    c.num_streams = 16            # fixed packing streams (the data depends on it, not on the host count);
                                  # the host count must divide it: each host packs its own share
    c.num_workers = 0             # > 0: a background thread prefetches this many batches
    c.min_chunk_tokens = 32       # Ettin drops chunks under 32 tokens
    c.backfill_tail = True        # a long document's short tail is back-filled from the previous chunk
    c.max_doc_chars = 1_000_000   # longer documents are split into parts (counted in stats)
    c.tokenize_lookahead = 16     # documents tokenized per encode_batch call in a stream
    c.token_cache_tokens = 50_000_000  # tokenized documents kept in memory (int32: 4 bytes each)
    c.verify_hashes = True        # MDS shards are checked against the hashes their index.json lists
    c.on_bad_sample = "error"     # a corrupt MDS shard or sample: "error" refuses it (one line naming the file),
                                  # "skip" skips and counts its samples (data_stats.json: skipped/corrupt)
    c.max_skip_fraction = 0.05    # the run stops when more of the documents read were skipped (any reason)
    c.replay_path = ""            # a folder of Ettin data-order Parquet files: replay those batches instead
    c.replay_first_step = -1      # file step of iterator step 0 (-1: the smallest step in the files)
    return c
