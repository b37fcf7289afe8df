"""Tests of ettin_jax.tokenizer: the shipped tokenizer, both trainable kinds, transformers parity, bad input, the CLI."""
import json
import os
import pickle

import pytest

from ettin_jax import tokenizer as tok_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "data", "tokenizer")
CORPUS = os.path.join(REPO, "data", "corpus")
EXPECTED_IDS = {"unk": 0, "cls": 1, "sep": 2, "pad": 3, "mask": 4}
SAMPLES = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "def encode(self, text: str) -> list[int]:\n\treturn self._tok.encode(text).ids  # tabs, spaces   and more",
    "Unicode: café, naïve, 日本語, emoji 🙂, math ∑ x² — and a trailing space ",
    "   leading spaces\n\n\nblank lines\r\nCRLF",
]


def corpus_texts(n_per_source=3):
    texts = []
    for name in sorted(os.listdir(CORPUS)):
        with open(os.path.join(CORPUS, name)) as f:
            texts += [json.loads(next(f))["text"] for _ in range(n_per_source)]
    return texts


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """About 150 KB of the bundled corpus: whole documents, as JSONL."""
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    with open(path, "w") as f:
        for text in corpus_texts(n_per_source=3):
            f.write(json.dumps({"id": "x", "text": text[:50_000]}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def trained(small_corpus, tmp_path_factory):
    """One tiny tokenizer of each kind."""
    out = {}
    for kind in tok_lib.KINDS:
        out[kind] = tok_lib.train_tokenizer([small_corpus], 600, kind, str(tmp_path_factory.mktemp(kind)))
    return out


def test_shipped_tokenizer_ids_and_size():
    tok = tok_lib.load_tokenizer(SHIPPED)
    assert tok.special_ids == EXPECTED_IDS
    assert (tok.unk_id, tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.vocab_size == 8192
    assert tok.kind == "bpe"
    with open(os.path.join(SHIPPED, tok_lib.METADATA_FILE)) as f:
        assert json.load(f)["special_ids"] == EXPECTED_IDS


def test_shipped_tokenizer_round_trip():
    tok = tok_lib.load_tokenizer(SHIPPED)
    texts = SAMPLES + corpus_texts(n_per_source=2)
    batch = tok.encode_batch(texts)
    for text, ids in zip(texts, batch):
        assert ids == tok.encode(text)
        assert not set(ids) & set(EXPECTED_IDS.values()), "encode must add no special tokens"
        assert tok.decode(ids) == text
    # Specials written in the text are recognised, as in ModernBERT.
    assert tok.mask_id in tok.encode("Paris is the [MASK] of France.")


@pytest.mark.parametrize("kind", tok_lib.KINDS)
def test_trained_kinds_round_trip_and_pickle(trained, kind):
    tok = trained[kind]
    assert tok.special_ids == EXPECTED_IDS
    assert 300 < tok.vocab_size <= 600
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(SAMPLES[0]) == tok.encode(SAMPLES[0]) and clone.special_ids == tok.special_ids
    expected = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", tok_lib.METADATA_FILE}
    if kind == "sentencepiece":
        expected.add(tok_lib.SPM_FILE)
    assert set(os.listdir(tok.path)) == expected


def test_sentencepiece_json_matches_sentencepiece_model(trained):
    import sentencepiece as spm

    tok = trained["sentencepiece"]
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tok.path, tok_lib.SPM_FILE))
    lines = [l for text in SAMPLES[:2] + corpus_texts(1) for l in text.split("\n") if l.strip()][:300]
    score = lambda ids: sum(sp.get_score(i) for i in ids)
    for line in lines:
        ours, theirs = tok.encode(line), sp.encode(line)
        # Identical up to ties between equally scored segmentations.
        assert ours == theirs or abs(score(ours) - score(theirs)) < 1e-4, line


@pytest.mark.parametrize("kind", ["shipped", *tok_lib.KINDS])
def test_autotokenizer_matches_encode(trained, kind):
    transformers = pytest.importorskip("transformers")
    tok = tok_lib.load_tokenizer(SHIPPED) if kind == "shipped" else trained[kind]
    hf = transformers.AutoTokenizer.from_pretrained(tok.path)
    assert (hf.cls_token_id, hf.sep_token_id, hf.pad_token_id, hf.mask_token_id, hf.unk_token_id) == (1, 2, 3, 4, 0)
    for text in SAMPLES + [corpus_texts(1)[0][:3000]]:
        ids = hf(text)["input_ids"]
        assert ids == [tok.cls_id] + tok.encode(text) + [tok.sep_id]
        assert hf.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("kind", tok_lib.KINDS)
def test_training_survives_invalid_utf8_and_empty_lines(tmp_path, small_corpus, kind):
    text_file = tmp_path / "bad.txt"
    with open(small_corpus) as f:
        good = "\n".join(json.loads(line)["text"][:20_000] for line in f).encode()
    text_file.write_bytes(b"\n\n   \nbad bytes \xff\xfe here\n" + good + b"\n\xc3\x28 truncated\n\n")
    jsonl_file = tmp_path / "bad.jsonl"
    jsonl_file.write_bytes(b'{"text": ""}\nnot json\n{"id": 1}\n{"text": "lone \\ud800 surrogate"}\n\n'
                           b'{"text": "ok \xff"}\n')
    tok = tok_lib.train_tokenizer([str(text_file), str(jsonl_file)], 500, kind, str(tmp_path / "tok"))
    stats = tok.metadata["trained_on"]
    assert stats["invalid_utf8"] == 4  # two text lines, one JSONL line's bytes, one lone surrogate
    assert stats["bad_lines_skipped"] == 2
    assert stats["empty_skipped"] >= 5
    assert tok.decode(tok.encode("bad bytes \ufffd here")) == "bad bytes \ufffd here"


def test_training_errors_are_clear(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(ValueError, match="no text found"):
        tok_lib.train_tokenizer([str(empty)], 1000, "bpe", str(tmp_path / "a"))
    with pytest.raises(ValueError, match="does not exist"):
        tok_lib.train_tokenizer([str(tmp_path / "missing.txt")], 1000, "bpe", str(tmp_path / "b"))
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        tok_lib.train_tokenizer([str(empty)], 100, "bpe", str(tmp_path / "c"))
    with pytest.raises(ValueError, match="kind='wordpiece'"):
        tok_lib.train_tokenizer([str(empty)], 1000, "wordpiece", str(tmp_path / "d"))


def test_check_compatible():
    tok = tok_lib.load_tokenizer(SHIPPED)
    tok_lib.check_compatible(tok, 8192, EXPECTED_IDS)
    tok_lib.check_compatible(tok, 8256, {"cls": 1, "sep": 2, "pad": None})
    modernbert = {"unk": 50280, "cls": 50281, "sep": 50282, "pad": 50283, "mask": 50284}
    with pytest.raises(ValueError, match=r"\[MASK\] is id 4 in the tokenizer but 50284 in the model config"):
        tok_lib.check_compatible(tok, 50368, modernbert)
    with pytest.raises(ValueError, match="8192 tokens but the model's embedding has only 4096 rows"):
        tok_lib.check_compatible(tok, 4096, EXPECTED_IDS)
    with pytest.raises(ValueError, match="unknown special token key 'bos'"):
        tok_lib.check_compatible(tok, 8192, {"bos": 1})


def test_cli_missing_path_is_one_clear_line(tmp_path, capsys):
    missing = str(tmp_path / "nope.jsonl")
    code = tok_lib.main(["ettin tokenizer", "train", f"--input={missing}", f"--out={tmp_path / 'o'}"],
                        subcommand="tokenizer")
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err and missing in err and "does not exist" in err
    assert len(err.strip().splitlines()) == 1


def test_cli_usage_errors_and_success(tmp_path, small_corpus, capsys):
    assert tok_lib.main(["ettin tokenizer", f"--input={small_corpus}", f"--out={tmp_path}"]) == 2
    assert "expected the action `train`" in capsys.readouterr().err
    assert tok_lib.main(["ettin tokenizer", "train", f"--out={tmp_path}"]) == 2
    assert "--input required" in capsys.readouterr().err
    assert tok_lib.main(["ettin tokenizer", "train", f"--input={small_corpus}", "--kind=wordpiece",
                         f"--out={tmp_path}"]) == 2
    assert "wordpiece" in capsys.readouterr().err
    out = tmp_path / "tok"
    argv = ["ettin tokenizer", "train", f"--input={small_corpus}", f"--input={small_corpus}", "--vocab_size=400",
            "--kind=bpe", f"--out={out}"]
    assert tok_lib.main(argv, subcommand="tokenizer") == 0
    assert tok_lib.main(argv, subcommand="tokenizer") == 0  # a second parse in one process: inputs not doubled
    assert "wrote bpe tokenizer" in capsys.readouterr().out
    meta = json.loads((out / tok_lib.METADATA_FILE).read_text())
    assert meta["trained_on"]["files"] == 2 and meta["vocab_size"] == 400
