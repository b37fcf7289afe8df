"""Helpers for the data tests: a stand-in byte tokenizer and small corpora written into tmp_path."""
import json
import os

import ml_collections
import numpy as np

import ettin_jax.data as data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ByteTokenizer:
    """The project tokenizer's interface over UTF-8 bytes: ids 0-4 are special, byte b is id b + 5."""

    special_ids = {"unk": 0, "cls": 1, "sep": 2, "pad": 3, "mask": 4}
    unk_id, cls_id, sep_id, pad_id, mask_id = 0, 1, 2, 3, 4
    vocab_size = 261

    def encode(self, text):
        return (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + 5).tolist()

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return bytes(int(i) - 5 for i in ids if i >= 5).decode("utf-8", "replace")


def write_jsonl(path, docs):
    with open(path, "w") as f:
        for doc_id, text in docs:
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return str(path)


def synthetic_corpus(tmp_path, n_docs=(60, 40), seed=0):
    """Two JSONL sources of documents of varied lengths (20 .. 3000 bytes)."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa"]
    paths = []
    for s, n in enumerate(n_docs):
        docs = []
        for i in range(n):
            length = int(rng.choice([3, 20, 80, 300, 600]))
            docs.append((f"s{s}/d{i}", " ".join(rng.choice(words, size=length))))
        paths.append(write_jsonl(tmp_path / f"src{s}.jsonl", docs))
    return paths


def synthetic_config(paths, weights=None, **overrides):
    cfg = data.default_data_config()
    cfg.sources = [dict(name=f"src{i}", format="jsonl", path=p, weight=(weights or [1.0] * len(paths))[i])
                   for i, p in enumerate(paths)]
    cfg.num_streams = 4
    cfg.tokenize_lookahead = 4
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def take(it, n):
    return [next(it) for _ in range(n)]


def model_fields(batch):
    return {k: v for k, v in batch.items() if isinstance(v, np.ndarray)}


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        fx, fy = model_fields(x), model_fields(y)
        assert fx.keys() == fy.keys()
        for k in fx:
            np.testing.assert_array_equal(fx[k], fy[k], err_msg=k)
        assert x["step"] == y["step"]
        assert x["provenance"]["rows"] == y["provenance"]["rows"]


__all__ = ["ByteTokenizer", "write_jsonl", "synthetic_corpus", "synthetic_config", "take", "assert_batches_equal",
           "ml_collections"]
