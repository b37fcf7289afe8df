"""Tests of ettin_jax.data's sources: MDS, TFDS, Parquet, text, replay; bad input counted; clear errors."""
import importlib.resources
import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ettin_jax.data as data
from ettin_jax.data import mds
from ettin_jax.data.stats import DataStats
from test_data_util import ByteTokenizer, synthetic_config, synthetic_corpus, take, write_jsonl

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
