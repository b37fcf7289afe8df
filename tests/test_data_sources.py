"""Tests of ettin_jax.data's sources: MDS, TFDS, Parquet, text, replay; bad input counted; clear errors."""
import hashlib
import importlib.resources
import json
import os
import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash

import ettin_jax.data as data
from ettin_jax.data import mds
from ettin_jax.data.stats import DataStats
from test_data_util import REPO, ByteTokenizer, synthetic_config, synthetic_corpus, take, write_jsonl

TOK = ByteTokenizer()


def _make(cfg, seq_len=128, batch=4, **kw):
    return data.make_pipeline(cfg, seq_len=seq_len, global_batch_size=batch, seed=0, mlm_rate=kw.pop("mlm_rate", 0.0),
                              tokenizer=TOK, **kw)


def _one_source(spec, **over):
    cfg = data.default_data_config()
    cfg.sources = [dict(name="only", weight=1.0, **spec)]
    cfg.num_streams = 2
    cfg.tokenize_lookahead = 4
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def _docs_of(pipe, steps):
    return {p[1] for b in take(pipe.iterator(), steps) for r in b["provenance"]["rows"] for p in r["pieces"]}


@pytest.mark.parametrize("compression", [None, "zstd"])
@pytest.mark.parametrize("encoding", ["ndarray:uint32", "ndarray"])
def test_mds_roundtrip(tmp_path, compression, encoding):
    rng = np.random.default_rng(0)
    samples = [{"id": f"doc-{i}", "input_ids": rng.integers(5, 261, size=int(rng.integers(1, 3000))).astype(np.uint32)}
               for i in range(50)]
    with mds.MdsWriter(tmp_path / "pool", {"id": "str", "input_ids": encoding}, compression=compression,
                       size_limit=20_000) as w:
        for s in samples:
            w.write(s)
    index = json.loads((tmp_path / "pool" / "index.json").read_text())
    assert index["version"] == 2 and len(index["shards"]) > 1
    assert index["shards"][0]["column_names"] == ["id", "input_ids"]
    reader = mds.MdsReader([tmp_path / "pool"])
    assert len(reader) == 50
    for i in (0, 17, 49):
        got = reader[i]
        assert got["id"] == samples[i]["id"]
        np.testing.assert_array_equal(got["input_ids"], samples[i]["input_ids"])
        assert got["input_ids"].dtype == np.uint32


def test_mds_source_in_pipeline_strips_and_readds_specials(tmp_path):
    with mds.MdsWriter(tmp_path / "pool" / "part_a", {"id": "str", "input_ids": "ndarray:uint32"}) as w:
        for i in range(20):
            w.write({"id": f"a{i}", "input_ids": np.array([1] + [10 + i] * 100 + [2], np.uint32)})
    pipe = _make(_one_source(dict(format="mds", path=str(tmp_path / "pool"))), seq_len=256)
    b = next(pipe.iterator())
    seg, tok = b["segment_ids"][0], b["tokens"][0]
    first = tok[seg == 1]
    assert first[0] == 1 and first[-1] == 2 and len(first) == 102  # [CLS] 100 tokens [SEP], not doubled
    assert pipe.stats()["skipped"] == 0


def test_tfds_dataset_built_locally_is_read_through_grain(tmp_path, monkeypatch):
    # Preparing (not reading) a TFDS dataset looks up `importlib_resources`, which TFDS does not declare; the
    # standard library's module has what it needs. Reading needs neither it nor TensorFlow.
    monkeypatch.setitem(sys.modules, "importlib_resources", importlib.resources)
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyEttinCorpus(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"id": tfds.features.Text(), "text": tfds.features.Text()}), disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(12):
                yield i, {"id": f"tf{i}", "text": f"tfds document {i} " * 20}

    TinyEttinCorpus(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    cfg = _one_source(dict(format="tfds", path="tiny_ettin_corpus", split="train", data_dir=str(tmp_path / "tfds")))
    pipe = _make(cfg, seq_len=512)
    docs = _docs_of(pipe, 3)
    assert docs and all(d.startswith("tf") for d in docs)


def test_parquet_and_text_sources(tmp_path):
    pq.write_table(pa.table({"text": [f"parquet row {i} " * 10 for i in range(30)],
                             "id": [f"pq{i}" for i in range(30)]}), tmp_path / "a.parquet", row_group_size=7)
    (tmp_path / "txt").mkdir()
    for i in range(5):
        (tmp_path / "txt" / f"f{i}.txt").write_text(f"plain text file {i} " * 15)
    cfg = data.default_data_config()
    cfg.sources = [dict(name="pq", format="parquet", path=str(tmp_path / "a.parquet"), weight=1.0),
                   dict(name="txt", format="text", path=str(tmp_path / "txt"), weight=1.0)]
    cfg.num_streams = 2
    docs = _docs_of(_make(cfg, seq_len=512), 4)
    assert any(d.startswith("pq") for d in docs) and any(d.endswith(".txt") for d in docs)


def test_bad_input_is_skipped_and_counted(tmp_path):
    good = [json.dumps({"id": f"g{i}", "text": f"good document {i} " * 20}).encode() for i in range(10)]
    bad = [b"", b"   ", json.dumps({"id": "e", "text": ""}).encode(), b"\xff\xfe not utf-8 \xc3\x28",
           b"{not json", json.dumps({"id": "nt", "body": "no text field"}).encode(),
           json.dumps({"id": "bin", "text": "nul \x00 inside"}).encode()]
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(good[:5] + bad + good[5:]) + b"\n")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "ok.txt").write_text("a readable text file " * 10)
    (tmp_path / "txt" / "blob.bin").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "txt" / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1") * 20)
    (tmp_path / "txt" / "empty.txt").write_bytes(b"")
    cfg = data.default_data_config()
    cfg.sources = [dict(name="j", format="jsonl", path=str(tmp_path / "mixed.jsonl"), weight=1.0),
                   dict(name="t", format="text", path=str(tmp_path / "txt"), weight=1.0)]
    cfg.num_streams = 1
    cfg.shuffle = False
    pipe = _make(cfg, seq_len=256, batch=2)
    take(pipe.iterator(), 12)  # more than one epoch of both sources
    s = pipe.stats()
    assert s["skipped/empty"] >= 3 and s["skipped/non_utf8"] >= 2 and s["skipped/bad_json"] >= 1
    assert s["skipped/no_text"] >= 1 and s["skipped/binary"] >= 1
    assert s["documents_used"] >= 11


def test_50mb_document_is_split_and_counted(tmp_path):
    big = ("word " * 10_000_000)[:50_000_000]
    path = write_jsonl(tmp_path / "big.jsonl", [("huge", big)] + [(f"s{i}", "small doc " * 20) for i in range(5)])
    cfg = _one_source(dict(format="jsonl", path=path), shuffle=False, num_streams=1)
    pipe = _make(cfg, seq_len=1024, batch=4)
    batches = take(pipe.iterator(), 3)
    s = pipe.stats()
    assert s["documents_split"] == 1
    pieces = [p for b in batches for r in b["provenance"]["rows"] for p in r["pieces"]]
    assert any(p[1].startswith("huge#part") for p in pieces)
    assert all(p[3] - p[2] <= 1022 for p in pieces)


def test_split_document_token_ranges_count_from_the_document_start(tmp_path):
    # Byte tokens: a piece [a, b) of document d is d's bytes a..b, whichever part it was tokenized in.
    words = np.random.default_rng(0).choice(["alpha", "beta", "gamma", "delta"], size=3000)
    docs = {"long": " ".join(words), "short": "one short document " * 5}
    path = write_jsonl(tmp_path / "docs.jsonl", list(docs.items()))
    cfg = _one_source(dict(format="jsonl", path=path), shuffle=False, num_streams=1, max_doc_chars=2000)
    pipe = _make(cfg, seq_len=256, batch=2)
    batches = take(pipe.iterator(), 20)
    assert pipe.stats()["documents_split"] >= 1
    parts_seen = set()
    for b in batches:
        for row, rec in zip(b["tokens"], b["provenance"]["rows"]):
            at = 0
            for source, doc_id, start, end in rec["pieces"]:
                name, _, part = doc_id.partition("#part")
                parts_seen.add(part)
                text = docs[name].encode()[start:end].decode()
                assert TOK.decode(row[at + 1:at + 1 + end - start]) == text, (doc_id, start, end)
                at += end - start + 2
    assert {"0", "1", "4"} <= parts_seen
    # A state saved inside a later part restores the same document-relative ranges.
    it = pipe.iterator()
    take(it, 13)
    again = _make(cfg, seq_len=256, batch=2).iterator()
    again.set_state(it.get_state())
    assert [b["provenance"] for b in take(again, 7)] == [b["provenance"] for b in batches[13:]]


def test_clear_errors_before_training(tmp_path):
    paths = synthetic_corpus(tmp_path)
    with pytest.raises(ValueError, match="does-not-exist.jsonl"):
        _make(synthetic_config([paths[0], str(tmp_path / "does-not-exist.jsonl")]))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="'src1'.*no documents"):
        _make(synthetic_config([paths[0], str(tmp_path / "empty.jsonl")]))
    with pytest.raises(ValueError, match="'src1'.*weight must be > 0, got 0.0"):
        _make(synthetic_config(paths, weights=[1.0, 0.0]))
    with pytest.raises(ValueError, match="weight must be > 0, got -1"):
        _make(synthetic_config(paths, weights=[-1.0, 1.0]))
    with pytest.raises(ValueError, match="not divisible by shard_count=3"):
        _make(synthetic_config(paths), batch=4, shard_count=3)
    with pytest.raises(ValueError, match="seq_len=16"):
        _make(synthetic_config(paths), seq_len=16)
    (tmp_path / "wrongfield.jsonl").write_text("\n".join(json.dumps({"body": "x" * 100}) for _ in range(5)))
    with pytest.raises(ValueError, match="'src0'.*text_field"):
        _make(synthetic_config([str(tmp_path / "wrongfield.jsonl")]))
    cfg = synthetic_config(paths)
    cfg.special_ids = {"cls": 7}
    with pytest.raises(ValueError, match="special ids differ"):
        _make(cfg)
    cfg = synthetic_config(paths)
    cfg.sources = []
    with pytest.raises(ValueError, match="no sources"):
        _make(cfg)
    for key, value, message in (("on_bad_sample", "ignore", "on_bad_sample='ignore'.*'error'.*'skip'"),
                                ("max_skip_fraction", 1.5, r"max_skip_fraction=1.5 must be in \[0, 1\]"),
                                ("max_row_wait", -1, "max_row_wait=-1 must be >= 0")):
        with pytest.raises(ValueError, match=message):
            _make(synthetic_config(paths, **{key: value}))


def _write_data_order(tmp_path, n_steps=6, batch=4, seq_len=64):
    rng = np.random.default_rng(0)
    expected = {}
    folder = tmp_path / "order" / "checkpoint_000100"
    folder.mkdir(parents=True)
    for lo in (1, 4):
        rows, steps = [], []
        for step in range(lo, lo + 3):
            expected[step] = []
            for _ in range(batch):
                n = int(rng.integers(30, seq_len - 1))
                seq = [1] + rng.integers(5, 261, size=n).tolist() + [2]
                expected[step].append(seq)
                rows.append(seq)
                steps.append(step)
        pq.write_table(pa.table({"input_ids": pa.array(rows, pa.list_(pa.uint32())), "step": steps}),
                       folder / f"steps_{lo:06d}_to_{lo + 2:06d}.parquet")
    return tmp_path / "order", expected


def test_replay_yields_the_released_batches_exactly(tmp_path):
    folder, expected = _write_data_order(tmp_path)
    cfg = data.default_data_config()
    cfg.replay_path = str(folder)
    for shard_count in (1, 2):
        parts = [_make(cfg, seq_len=64, batch=4, mlm_rate=0.3, shard_index=i, shard_count=shard_count)
                 for i in range(shard_count)]
        batches = [take(p.iterator(), 6) for p in parts]
        for n in range(6):
            tokens = np.concatenate([b[n]["tokens"] for b in batches])
            seg = np.concatenate([b[n]["segment_ids"] for b in batches])
            for r, seq in enumerate(expected[n + 1]):
                np.testing.assert_array_equal(tokens[r, :len(seq)], seq)
                assert (tokens[r, len(seq):] == TOK.pad_id).all() and (seg[r] > 0).sum() == len(seq)
    it = _make(cfg, seq_len=64, batch=4).iterator()
    take(it, 2)
    again = _make(cfg, seq_len=64, batch=4).iterator()
    again.set_state(it.get_state())
    np.testing.assert_array_equal(next(again)["tokens"][0, :len(expected[3][0])], expected[3][0])
    with pytest.raises(ValueError, match="has 4 sequences, but global_batch_size is 8"):
        next(_make(cfg, seq_len=64, batch=8).iterator())


def test_stats_fields():
    s = DataStats()
    s.add("tokens", 98)
    s.add("pad_tokens", 2)
    s.skip("binary")
    d = s.as_dict()
    assert d["packing_efficiency"] == pytest.approx(0.98) and d["skipped"] == 1 and d["skipped/binary"] == 1


# -- integrity at the door: corrupt MDS shards, out-of-range ids, the skip limit -----------------------------------

def _mds_pool(path, n=120, compression=None, size_limit=1 << 26, bad_every=0, seed=0):
    """n documents of byte-tokenizer ids; with bad_every=k, every k-th one (from k - 1) has an id >= vocab_size."""
    rng = np.random.default_rng(seed)
    with mds.MdsWriter(path, {"id": "str", "input_ids": "ndarray:uint32"}, compression=compression,
                       size_limit=size_limit) as w:
        for i in range(n):
            ids = rng.integers(5, TOK.vocab_size, size=int(rng.integers(40, 400))).astype(np.uint32)
            if bad_every and i % bad_every == bad_every - 1:
                ids[len(ids) // 2] = TOK.vocab_size + i
            w.write({"id": f"doc-{i}", "input_ids": ids})
    return sorted(str(p) for p in path.glob("shard.*"))


def _flip(path, at, xor=0xFF):
    b = bytearray(open(path, "rb").read())
    b[at] ^= xor
    open(path, "wb").write(bytes(b))


def _token_byte(path, sample=60, token=10):
    """The offset of the high byte of input_ids[token] of `sample` in an uncompressed shard (see mds.py's layout):
    two uint32 column sizes, the id (doc-NN), ndarray's shape header (one byte: ndim << 2 | shape dtype code, then
    the shape), then the uint32 ids."""
    data = open(path, "rb").read()
    begin = int(np.frombuffer(data, np.uint32, count=1, offset=4 + 4 * sample)[0])
    id_len = int(np.frombuffer(data, np.uint32, count=1, offset=begin)[0])
    head = data[begin + 8 + id_len]
    return begin + 8 + id_len + 1 + (head >> 2) * (1 << (head & 3)) + 4 * token + 3


# The bad inputs of issue 27: (pool compression, where the byte is flipped, what a check without hashes says).
_CORRUPTIONS = {
    "offset_table": (None, lambda p: 4 + 4 * 3 + 2, "corrupt offset table"),
    "zstd_header": ("zstd", lambda p: 1, "not a readable zstd file"),
    "zstd_payload": ("zstd", lambda p: os.path.getsize(p) // 2, "cannot be decoded"),
    "raw_tokens": (None, _token_byte, "bad_token_ids"),
}


@pytest.mark.parametrize("case", sorted(_CORRUPTIONS))
def test_corrupt_mds_shard_is_refused_naming_the_file(tmp_path, case):
    compression, where, unhashed = _CORRUPTIONS[case]
    shard, = _mds_pool(tmp_path / "pool", compression=compression)
    # index.json's hash is what mosaicml-streaming writes: xxhash's hexdigest of the file's bytes.
    index = json.loads((tmp_path / "pool" / "index.json").read_text())
    info = index["shards"][0]["zip_data" if compression else "raw_data"]
    assert info["hashes"]["xxh64"] == xxhash.xxh64(open(shard, "rb").read()).hexdigest()
    _flip(shard, where(shard), 0x80 if case == "raw_tokens" else 0xFF)
    cfg = _one_source(dict(format="mds", path=str(tmp_path / "pool")))
    with pytest.raises(ValueError, match=re.escape(shard) + ".*xxh64 checksum mismatch") as e:
        take(_make(cfg, seq_len=256).iterator(), 40)
    assert "\n" not in str(e.value)
    # Without the hash check, the layout checks and the id range still keep the damage from the model.
    cfg.verify_hashes = False
    cfg.max_skip_fraction = 1.0
    try:
        pipe = _make(cfg, seq_len=256)
        batches = take(pipe.iterator(), 100)  # more than an epoch: every sample is read
    except ValueError as e:
        assert re.search(re.escape(shard) + ".*(" + unhashed + ")", str(e)), str(e)
        assert "\n" not in str(e)
        return
    assert all(((b["tokens"] >= 0) & (b["tokens"] < TOK.vocab_size)).all() for b in batches)
    if case == "raw_tokens":  # (a flip inside a zstd payload may change a byte that still decodes: only the hash sees it)
        assert pipe.stats()["skipped/bad_token_ids"] >= 1 and shard in pipe.stats()["skipped_examples"][0]


def test_a_shard_listing_only_sha1_is_checked_too(tmp_path):
    with mds.MdsWriter(tmp_path / "pool", {"id": "str", "input_ids": "ndarray:uint32"}, compression=None,
                       hashes=("sha1",)) as w:
        for i in range(40):
            w.write({"id": f"d{i}", "input_ids": np.full(50, 7 + i, np.uint32)})
    shard = str(tmp_path / "pool" / "shard.00000.mds")
    listed = json.loads((tmp_path / "pool" / "index.json").read_text())["shards"][0]["raw_data"]["hashes"]
    assert listed == {"sha1": hashlib.sha1(open(shard, "rb").read()).hexdigest()}
    _flip(shard, _token_byte(shard, sample=5) - 3, 0x01)  # a token's low byte: the ids stay in range
    with pytest.raises(ValueError, match=re.escape(shard) + ".*sha1 checksum mismatch"):
        take(_make(_one_source(dict(format="mds", path=str(tmp_path / "pool"))), seq_len=256).iterator(), 4)


def test_a_sample_whose_column_sizes_disagree_with_its_length_is_refused(tmp_path):
    with mds.MdsWriter(tmp_path / "pool", {"a": "str", "b": "str"}, compression=None) as w:
        for i in range(3):
            w.write({"a": f"first {i}", "b": f"second {i}"})
    shard = str(tmp_path / "pool" / "shard.00000.mds")
    data = open(shard, "rb").read()
    begin = int(np.frombuffer(data, np.uint32, count=1, offset=4 + 4 * 1)[0])
    _flip(shard, begin + 4, 0x01)  # column b's size, 8 -> 9 bytes: decodable, but it disagrees with the sample
    reader = mds.MdsReader([tmp_path / "pool"], verify_hashes=False)
    assert reader[0] == {"a": "first 0", "b": "second 0"}
    with pytest.raises(mds.MdsError, match=re.escape(shard) + " sample 1 cannot be decoded.*do not add up"):
        reader[1]


def test_on_bad_sample_skip_skips_and_counts_a_corrupt_shards_samples(tmp_path):
    shards = _mds_pool(tmp_path / "pool", n=60, compression="zstd", size_limit=6_000)
    assert len(shards) >= 4
    _flip(shards[1], os.path.getsize(shards[1]) // 2)
    reader = mds.MdsReader([tmp_path / "pool"])
    bad_ids = set()
    for i in range(len(reader)):
        try:
            reader[i]
        except mds.MdsError as e:
            assert shards[1] in str(e)
            bad_ids.add(f"doc-{i}")
    assert bad_ids  # the samples of shards[1], and only those
    cfg = _one_source(dict(format="mds", path=str(tmp_path / "pool")), on_bad_sample="skip", max_skip_fraction=1.0)
    pipe = _make(cfg, seq_len=256)
    docs = _docs_of(pipe, 60)
    s = pipe.stats()
    assert docs and not docs & bad_ids
    assert s["skipped/corrupt"] > 0 and s["skipped_per_source/only"] == s["skipped"] == s["skipped/corrupt"]
    assert shards[1] in s["skipped_examples"][0]


def test_out_of_range_ids_never_reach_the_batch_and_are_counted(tmp_path):
    _mds_pool(tmp_path / "pool", n=120, bad_every=7)
    bad = {f"doc-{i}" for i in range(6, 120, 7)}
    cfg = _one_source(dict(format="mds", path=str(tmp_path / "pool")), max_skip_fraction=1.0)
    pipe = _make(cfg, seq_len=256)
    batches = take(pipe.iterator(), 60)
    docs = {p[1] for b in batches for r in b["provenance"]["rows"] for p in r["pieces"]}
    assert docs and not docs & bad
    assert all(((b["tokens"] >= 0) & (b["tokens"] < TOK.vocab_size)).all() for b in batches)
    s = pipe.stats()
    # Each document the streams reached is counted once per reading: the bad ones among them are the skips.
    assert s["skipped/bad_token_ids"] == s["skipped_per_source/only"] == s["documents_read"] - s["documents_used"]
    assert s["skipped/bad_token_ids"] >= len(bad)  # 60 steps of 4 rows: more than one epoch
    first = s["skipped_examples"][0]
    assert re.search(r"shard\.00000\.mds sample (\d+) \(id 'doc-\1'", first), first
    # The same pool with the default limit (5% of the documents read) stops the run, with the count.
    with pytest.raises(ValueError, match=r"data: \d+ of \d+ documents skipped .*max_skip_fraction=0.05"):
        take(_make(_one_source(dict(format="mds", path=str(tmp_path / "pool"))), seq_len=256).iterator(), 60)


def test_replay_rows_with_out_of_range_ids_are_left_empty_and_counted(tmp_path):
    folder, expected = _write_data_order(tmp_path)
    f = sorted(folder.rglob("*.parquet"))[0]
    table = pq.read_table(f).to_pydict()
    table["input_ids"][1] = table["input_ids"][1][:5] + [TOK.vocab_size + 3] + table["input_ids"][1][6:]
    pq.write_table(pa.table({"input_ids": pa.array(table["input_ids"], pa.list_(pa.uint32())),
                             "step": table["step"]}), f)
    cfg = data.default_data_config()
    cfg.replay_path = str(folder)
    pipe = _make(cfg, seq_len=64, batch=4)
    b = next(pipe.iterator())
    assert (b["segment_ids"][1] == 0).all() and (b["segment_ids"][0] > 0).any()
    assert pipe.stats()["skipped/bad_token_ids"] == 1 and "row 1" in pipe.stats()["skipped_examples"][0]


def test_unreadable_text_files_are_skipped_and_a_broken_tfds_source_is_one_line(tmp_path):
    from ettin_jax.data import sources
    (tmp_path / "txt").mkdir()
    for i in range(3):
        (tmp_path / "txt" / f"f{i}.txt").write_text(f"plain text file {i} " * 15)
    (tmp_path / "txt" / "gone.txt").symlink_to(tmp_path / "nowhere.txt")  # listed, but cannot be read
    pipe = _make(_one_source(dict(format="text", path=str(tmp_path / "txt")), max_skip_fraction=1.0), seq_len=256)
    assert not any(d.endswith("gone.txt") for d in _docs_of(pipe, 4))
    s = pipe.stats()
    assert s["skipped/unreadable"] >= 1 and "gone.txt" in s["skipped_examples"][0]

    class Broken:
        def __getitem__(self, i):
            raise OSError("array_record: corrupt chunk")
    tfds_source = object.__new__(sources.TfdsSource)
    tfds_source.name, tfds_source.dataset, tfds_source.split, tfds_source.ds = "t", "tiny", "train", Broken()
    tfds_source.text_field, tfds_source.id_field = "text", "id"
    with pytest.raises(ValueError, match=r"source 't': TFDS tiny/train example 3 cannot be read \(OSError: array_record"):
        tfds_source.load(3, DataStats())


def test_corrupt_parquet_is_one_line_naming_the_file(tmp_path):
    pq.write_table(pa.table({"text": [f"parquet row {i} " * 10 for i in range(30)]}), tmp_path / "good.parquet",
                   compression="zstd")
    raw = (tmp_path / "good.parquet").read_bytes()
    for at in (20, 40, 100):  # inside the data page: a broken zstd frame, bad UTF-8, corrupt data
        (tmp_path / f"page{at}.parquet").write_bytes(raw[:at] + b"\xff" * 16 + raw[at + 16:])
    (tmp_path / "short.parquet").write_bytes(raw[:len(raw) // 2])
    (tmp_path / "other.parquet").write_bytes(b"PAR1 not a parquet file")
    for name in ("page20.parquet", "page40.parquet", "page100.parquet", "short.parquet", "other.parquet"):
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / name))) as e:
            take(_make(_one_source(dict(format="parquet", path=str(tmp_path / name))), seq_len=256).iterator(), 4)
        assert "\n" not in str(e.value)


@pytest.mark.slow
def test_train_refuses_a_corrupt_mds_pool_in_one_line_and_writes_nothing(tmp_path, capsys):
    from ettin_jax import cli
    shard, = _mds_pool(tmp_path / "pool", compression="zstd")
    _flip(shard, 1)  # the zstd frame header
    config = tmp_path / "mds_config.py"
    config.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('demo', {os.path.join(REPO, 'configs', 'demo.py')!r})\n"
        "demo = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(demo)\n\n\n"
        "def get_config(arg=None):\n"
        "    c = demo.get_config()\n"
        f"    c.data.sources = [dict(name='pool', format='mds', path={str(tmp_path / 'pool')!r}, weight=1.0)]\n"
        "    return c\n")
    workdir = tmp_path / "run"
    assert cli.main(["ettin", "train", f"--config={config}", f"--workdir={workdir}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and shard in err and "checksum mismatch" in err, err
    assert not workdir.exists()
