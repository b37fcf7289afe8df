"""Tokenizers: training (byte-level BPE or SentencePiece), loading, and checking one against a model config.

    ettin tokenizer train --input=data/corpus --vocab_size=8192 --kind=bpe --out=data/tokenizer

Both kinds write a folder that `transformers.AutoTokenizer.from_pretrained(folder)` loads as it is: a `tokenizer.json`
in ModernBERT's format (a `PreTrainedTokenizerFast` whose post-processor wraps a sequence as `[CLS] $A [SEP]`), its
`tokenizer_config.json` and `special_tokens_map.json`, plus `ettin_tokenizer.json` (kind, size, special-token ids and
what it was trained on). The SentencePiece kind also keeps its `sentencepiece.model`; its `tokenizer.json` is the same
Unigram model in the Hugging Face `tokenizers` format, so that encoding in this project and in transformers is one
implementation.

An exported model's folder gets the tokenizer its architecture needs (`write_hf_tokenizer`): the decoder's adds only
[CLS] (BOS), not the trailing [SEP] (EOS), and both declare their BOS/EOS, so Hugging Face tools need no arguments.

`TextTokenizer` reads any Hugging Face tokenizer folder (an export, a released checkpoint's) for inference and
evaluation, giving the ids transformers gives.

Ettin's special tokens are [UNK] [CLS] [SEP] [PAD] [MASK]; a trained tokenizer puts them at ids 0..4 in that order.
(ModernBERT's own tokenizer has them at 50280..50284: the ids always come from the tokenizer, never from constants.)
"""
import gzip
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence

import tokenizers
from absl import flags
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = {"unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]"}
KINDS = ("bpe", "sentencepiece")
NUM_BYTES = 256  # both kinds hold every byte as a token (byte-level alphabet / SentencePiece byte fallback)
METADATA_FILE = "ettin_tokenizer.json"
SPM_FILE = "sentencepiece.model"
MODEL_MAX_LENGTH = 8192  # ModernBERT's tokenizer_config value; the model's context is set by its own config

class TextTokenizer:
    """A Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json) read with `tokenizers`.

    `encode` and `decode` give what `transformers.AutoTokenizer.from_pretrained(folder)` gives for ModernBERT's
    PreTrainedTokenizerFast: ids with the post-processor's special tokens, decoding special tokens kept.
    """

    def __init__(self, folder: str):
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"no tokenizer.json in {folder!r}: expected a Hugging Face tokenizer folder")
        self.folder = folder
        self._tok = read_tokenizer_json(path)
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
            if os.path.isfile(os.path.join(folder, name)):
                with open(os.path.join(folder, name)) as f:
                    config.update(json.load(f))

        def token(key, default):
            t = config.get(key, default)
            return t.get("content") if isinstance(t, dict) else t

        self.mask_token, self.cls_token, self.sep_token = (
            token("mask_token", "[MASK]"), token("cls_token", "[CLS]"), token("sep_token", "[SEP]"))
        self.mask_id, self.cls_id, self.sep_id = (
            self._tok.token_to_id(t) if t else None for t in (self.mask_token, self.cls_token, self.sep_token))
        # transformers skips the WordPiece-era clean-up for BPE models unless forced.
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(self._tok.model).__name__ != "BPE"
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids with the special tokens the tokenizer adds ([CLS] ... [SEP] for ModernBERT)."""
        return self._tok.encode(text, add_special_tokens=True).ids

    def ids(self, text: str) -> list[int]:
        """Ids of `text` alone, no special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encoding(self, text: str, add_special_tokens: bool = True):
        """The `tokenizers.Encoding` of `text` (ids with their character offsets)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self._clean_up:
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text


def read_tokenizer_json(path: str):
    """`tokenizers.Tokenizer.from_file`, with a malformed file (cut short, not a tokenizer) as a ValueError naming
    it (the library raises a bare Exception with the parser's message)."""
    try:
        return tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception for every parse error
        raise ValueError(f"{path} is not a readable tokenizer.json ({_one_line(e)}); copy or train the tokenizer "
                         "again") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


class Tokenizer:
    """A trained tokenizer: `encode` adds no special tokens; the special ids are attributes.

    Pickles as its folder path and rebuilds from it (cheap), so Grain workers can receive one.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        json_file = os.path.join(self.path, "tokenizer.json")
        if not os.path.isfile(json_file):
            raise ValueError(f"no tokenizer.json in {self.path!r}: expected a folder written by `ettin tokenizer train`"
                             " or a Hugging Face tokenizer folder")
        self._tok = read_tokenizer_json(json_file)
        meta_file = os.path.join(self.path, METADATA_FILE)
        self.metadata = {}
        if os.path.isfile(meta_file):
            with open(meta_file) as f:
                self.metadata = json.load(f)
        self.kind = self.metadata.get("kind", "unknown")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = {}
        for key, token in SPECIAL_TOKENS.items():
            token_id = self._tok.token_to_id(token)
            if token_id is None:
                raise ValueError(f"tokenizer {self.path!r} has no {token} token; Ettin needs all of "
                                 f"{' '.join(SPECIAL_TOKENS.values())}")
            self.special_ids[key] = token_id
        self.unk_id, self.cls_id, self.sep_id, self.pad_id, self.mask_id = (
            self.special_ids[k] for k in ("unk", "cls", "sep", "pad", "mask"))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without [CLS]/[SEP]."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` over many texts, in parallel threads (the fast path for data pipelines)."""
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __reduce__(self):
        return (Tokenizer, (self.path,))

    def __repr__(self):
        return f"Tokenizer({self.path!r}, kind={self.kind}, vocab_size={self.vocab_size}, special_ids={self.special_ids})"


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer in folder `path` (or the folder of `path` if it names its tokenizer.json)."""
    if os.path.isfile(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ValueError(f"tokenizer folder {path!r} does not exist")
    return Tokenizer(path)


def check_compatible(tokenizer: Tokenizer, model_vocab_size: int, expected_special_ids: dict) -> None:
    """Raises ValueError unless the tokenizer fits a model: same special-token ids, vocabulary within the embedding.

    `expected_special_ids` maps some of unk/cls/sep/pad/mask to the model config's ids (None values are not checked).
    """
    problems = []
    for key, expected in expected_special_ids.items():
        if key not in SPECIAL_TOKENS:
            raise ValueError(f"unknown special token key {key!r}; expected some of {', '.join(SPECIAL_TOKENS)}")
        if expected is not None and tokenizer.special_ids[key] != int(expected):
            problems.append(f"{SPECIAL_TOKENS[key]} is id {tokenizer.special_ids[key]} in the tokenizer "
                            f"but {expected} in the model config")
    if tokenizer.vocab_size > model_vocab_size:
        problems.append(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has only "
                        f"{model_vocab_size} rows (vocab_size must be >= {tokenizer.vocab_size})")
    if problems:
        raise ValueError(f"tokenizer {tokenizer.path!r} does not match the model: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------------------
# Reading training text.

class TextStats:
    """What reading the inputs found; written to ettin_tokenizer.json."""

    def __init__(self):
        self.files, self.documents, self.bytes = 0, 0, 0
        self.empty_skipped, self.invalid_utf8, self.bad_lines_skipped = 0, 0, 0

    def as_dict(self) -> dict:
        return dict(vars(self))


def _input_files(inputs: list[str]) -> list[str]:
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                           if f.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst", ".txt", ".txt.gz")))
            if not found:
                raise ValueError(f"input folder {path!r} holds no .jsonl or .txt files")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise ValueError(f"input {path!r} does not exist")
    return files


def _open_binary(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard
        return zstandard.open(path, "rb")
    return open(path, "rb")


def iter_documents(inputs: list[str], stats: TextStats | None = None) -> Iterator[str]:
    """Training texts from `inputs`: each JSONL line's "text", each non-empty line of any other file.

    Invalid UTF-8 becomes U+FFFD (counted in stats.invalid_utf8); empty texts and malformed JSONL lines are skipped
    and counted.
    """
    stats = stats if stats is not None else TextStats()
    for path in _input_files(inputs):
        stats.files += 1
        is_jsonl = ".jsonl" in os.path.basename(path)
        with _open_binary(path) as f:
            for raw in f:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    stats.invalid_utf8 += 1
                    line = raw.decode("utf-8", errors="replace")
                if is_jsonl:
                    if not line.strip():
                        stats.empty_skipped += 1
                        continue
                    try:
                        text = json.loads(line)["text"]
                        if not isinstance(text, str):
                            raise TypeError(type(text))
                    except (ValueError, KeyError, TypeError):
                        stats.bad_lines_skipped += 1
                        continue
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:  # lone surrogates from a JSON escape
                        stats.invalid_utf8 += 1
                        text = text.encode("utf-8", errors="replace").decode("utf-8")
                else:
                    text = line.rstrip("\r\n")
                if not text.strip():
                    stats.empty_skipped += 1
                    continue
                stats.documents += 1
                stats.bytes += len(text.encode("utf-8"))
                yield text


# ---------------------------------------------------------------------------------------------------------------
# Training.

def _special_added_tokens() -> list[AddedToken]:
    # As in ModernBERT: [MASK] absorbs the space before it, so "Paris is [MASK]." fills like "Paris is Lyon.".
    return [AddedToken(t, special=True, normalized=False, lstrip=(key == "mask")) for key, t in SPECIAL_TOKENS.items()]


def _train_bpe(texts: Iterator[str], vocab_size: int) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=_special_added_tokens(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _train_sentencepiece(texts: Iterator[str], vocab_size: int, out_dir: str) -> tokenizers.Tokenizer:
    import sentencepiece as spm

    def lines():  # SentencePiece trains on sentences (it drops long ones): one per line, newlines via byte fallback
        for text in texts:
            for line in text.split("\n"):
                if line.strip():
                    yield line

    specials = list(SPECIAL_TOKENS.values())
    prefix = os.path.join(out_dir, SPM_FILE[:-len(".model")])
    try:
        with open(os.devnull, "w") as log:
            spm.SentencePieceTrainer.train(
                sentence_iterator=lines(), model_prefix=prefix, vocab_size=vocab_size, model_type="unigram",
                unk_id=0, unk_piece=specials[0], bos_id=-1, eos_id=-1, pad_id=-1, user_defined_symbols=specials[1:],
                byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
                add_dummy_prefix=False, allow_whitespace_only_pieces=True, hard_vocab_limit=False,
                max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1, logstream=log)
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training failed (vocab_size={vocab_size}): {e}") from None
    os.remove(prefix + ".vocab")
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    # The same Unigram model in the `tokenizers` format: spaces are "▁", no dummy prefix, bytes as <0xXX> fallback.
    tok = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def train_tokenizer(inputs: list[str], vocab_size: int, kind: str, out_dir: str) -> Tokenizer:
    """Trains a tokenizer of `kind` ('bpe' or 'sentencepiece') on `inputs` and writes it to `out_dir`.

    `inputs` are text files (one example per line), JSONL files (field "text", also .gz/.zst) or folders of them.
    `vocab_size` counts the special tokens; on a small corpus the vocabulary may come out smaller.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {', '.join(KINDS)}")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise ValueError("no input given: pass at least one text/JSONL file or folder")
    minimum = len(SPECIAL_TOKENS) + NUM_BYTES
    if vocab_size <= minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small: the {len(SPECIAL_TOKENS)} special tokens and the "
                         f"{NUM_BYTES} byte tokens alone take {minimum}; use more than {minimum}")
    _input_files(inputs)  # fails early on a missing path
    # Read once into memory: the corpora meant here are megabytes, and an empty input must fail before training.
    stats = TextStats()
    texts = list(iter_documents(inputs, stats))
    if not texts:
        raise ValueError(f"no text found in {', '.join(inputs)} ({stats.empty_skipped} empty and "
                         f"{stats.bad_lines_skipped} malformed lines skipped)")
    os.makedirs(out_dir, exist_ok=True)
    if kind == "bpe":
        tok = _train_bpe(iter(texts), vocab_size)
    else:
        tok = _train_sentencepiece(iter(texts), vocab_size, out_dir)
    tok.add_special_tokens(_special_added_tokens())
    ids = {key: tok.token_to_id(t) for key, t in SPECIAL_TOKENS.items()}
    cls, sep = SPECIAL_TOKENS["cls"], SPECIAL_TOKENS["sep"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, ids["cls"]), (sep, ids["sep"])])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    _write_hf_configs(out_dir)
    metadata = {
        "kind": kind,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "requested_vocab_size": vocab_size,
        "special_tokens": SPECIAL_TOKENS,
        "special_ids": ids,
        "trained_on": {"inputs": list(inputs), **stats.as_dict()},
        "library": {"tokenizers": tokenizers.__version__},
    }
    if kind == "sentencepiece":
        import sentencepiece
        metadata["library"]["sentencepiece"] = sentencepiece.__version__
    with open(os.path.join(out_dir, METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=2)
        f.write("\n")
    return Tokenizer(out_dir)


def _write_hf_configs(out_dir: str) -> None:
    """ModernBERT's tokenizer_config.json / special_tokens_map.json (clean-up of spaces off, so decoding is exact)."""
    special = {f"{key}_token": token for key, token in SPECIAL_TOKENS.items()}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": MODEL_MAX_LENGTH,
        **special,
    }
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(content, f, indent=2)
            f.write("\n")


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer of an exported model.

# What each exported architecture's tokenizer adds around a text, in `tokenizers`' TemplateProcessing notation. The
# encoder's is ModernBERT's. Ettin's decoder chunks start with [CLS] (its BOS) and the decoder continues the text, so
# its tokenizer adds no [SEP] (EOS): a prompt that ended with one would be continued after an end of sequence.
TEMPLATES = {
    "encoder": dict(single="{cls}:0 $A:0 {sep}:0", pair="{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1"),
    "decoder": dict(single="{cls}:0 $A:0", pair="{cls}:0 $A:0 $B:1"),
}
# The Hugging Face names of the special tokens: BOS is [CLS] and EOS is [SEP], as in ModernBERT's config.json.
HF_SPECIAL = {"bos_token": "cls", "eos_token": "sep", "unk_token": "unk", "sep_token": "sep", "pad_token": "pad",
              "cls_token": "cls", "mask_token": "mask"}


def write_hf_tokenizer(src_dir: str, out_dir: str, arch: str, special_ids: dict) -> None:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json of an exported `arch` model.

    The vocabulary is `src_dir`'s; the special tokens are the ones at `special_ids` (unk/cls/sep/pad/mask -> id, the
    model config's ids); the post-processor is `TEMPLATES[arch]`, so that transformers' AutoTokenizer, the
    text-generation pipeline and lm-evaluation-harness encode a text as the model was trained on it without any
    argument. Keys of the source tokenizer_config.json other than the special tokens are kept.
    """
    if arch not in TEMPLATES:
        raise ValueError(f"architecture {arch!r} is not one of {', '.join(TEMPLATES)}")
    tok = tokenizers.Tokenizer.from_file(os.path.join(src_dir, "tokenizer.json"))
    names = {}
    for key in SPECIAL_TOKENS:
        token = tok.id_to_token(int(special_ids[key]))
        if token is None:
            raise ValueError(f"tokenizer {src_dir!r} has no token with id {special_ids[key]}, the model's "
                             f"{key} id; export with the tokenizer the model was trained with")
        names[key] = token
    template = TEMPLATES[arch]
    tok.post_processor = processors.TemplateProcessing(
        single=template["single"].format(**names), pair=template["pair"].format(**names),
        special_tokens=[(names["cls"], int(special_ids["cls"])), (names["sep"], int(special_ids["sep"]))])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_input_names": ["input_ids", "attention_mask"], "model_max_length": MODEL_MAX_LENGTH}
    src_config = os.path.join(src_dir, "tokenizer_config.json")
    if os.path.isfile(src_config):
        with open(src_config) as f:
            config.update(json.load(f))
    for key in ("add_bos_token", "add_eos_token"):  # transformers would rebuild the post-processor from these
        config.pop(key, None)
    special = {hf_name: names[key] for hf_name, key in HF_SPECIAL.items()}
    config.update(special)
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(content, f, indent=2)
            f.write("\n")


# ---------------------------------------------------------------------------------------------------------------
# Command line.

USAGE = "train --input=PATH [--input=PATH ...] --vocab_size=N --kind=bpe|sentencepiece --out=DIR"


def main(argv: list[str], subcommand: str | None = None) -> int:
    """`ettin tokenizer train ...`; returns the exit status. Errors are one line on stderr, not a traceback."""
    prog = argv[0] if argv else "ettin tokenizer"
    from ettin_jax import cli
    # parse_flags unparses first: a second call in one process must not add to the first call's --input list.
    FLAGS = flags.FlagValues()  # private: made when the command runs, never on import
    flags.DEFINE_multi_string("input", None, "text file, JSONL file (field \"text\") or folder of them; repeatable",
                              flag_values=FLAGS)
    flags.DEFINE_integer("vocab_size", 8192, "vocabulary size including the 5 special tokens", flag_values=FLAGS)
    flags.DEFINE_enum("kind", "bpe", KINDS, "byte-level BPE (ModernBERT's kind) or a SentencePiece Unigram model",
                      flag_values=FLAGS)
    flags.DEFINE_string("out", None, "folder to write the tokenizer to", flag_values=FLAGS)
    positional = cli.parse_flags(FLAGS, argv, USAGE, positional=True)
    if isinstance(positional, int):
        return positional
    if positional != ["train"]:
        got = " ".join(positional) or "nothing"
        print(f"{prog}: error: expected the action `train`, got {got}; usage: {prog} {USAGE}", file=sys.stderr)
        return 2
    missing = [f"--{name}" for name in ("input", "out") if not FLAGS[name].value]
    if missing:
        print(f"{prog}: error: {' and '.join(missing)} required; usage: {prog} {USAGE}", file=sys.stderr)
        return 2
    try:
        tok = train_tokenizer(FLAGS.input, FLAGS.vocab_size, FLAGS.kind, FLAGS.out)
    except (ValueError, OSError) as e:
        print(f"{prog} train: error: {cli.user_error(e) or e}", file=sys.stderr)
        return 2
    trained = tok.metadata["trained_on"]
    print(f"wrote {tok.kind} tokenizer to {FLAGS.out}: vocab_size={tok.vocab_size}, special ids {tok.special_ids}; "
          f"trained on {trained['documents']} texts ({trained['bytes']} bytes) from {trained['files']} files, "
          f"skipped {trained['empty_skipped']} empty and {trained['bad_lines_skipped']} malformed, "
          f"{trained['invalid_utf8']} with invalid UTF-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
