"""A reader and a writer for MosaicML Streaming's MDS format (what Ettin's pre-tokenized shards use).

`mosaicml-streaming` is not a dependency: this is the subset the Ettin pools need. A dataset folder holds
`index.json` ({"version": 2, "shards": [...]}) and shards `shard.NNNNN.mds`, or `shard.NNNNN.mds.zstd` when
compressed. A shard is: uint32 sample count n; n + 1 uint32 byte offsets (from the start of the shard) of each
sample; then the samples. A sample is: one uint32 size per variable-size column, then the columns' bytes in
`column_names` order. Encodings read here: `str`, `bytes`, `int`, scalar dtypes, `json` and `ndarray[:dtype[:shape]]`
(dynamic dtype: one byte code; dynamic shape: one byte `ndim << 2 | shape_dtype_code`, then the shape).

Integrity. index.json lists, per shard file, hashes of its bytes (`"hashes": {"xxh64": "<hex>"}`, the digests
mosaicml-streaming's `get_hash` writes: hashlib's or the `xxhash` package's `hexdigest()`). The reader checks one of
them (the fastest listed) when it loads a shard, unless `verify_hashes=False`; it also checks the shard's layout
(sample count, offset table, size) and decodes samples defensively. Whatever is wrong is one `MdsError` naming the
file (and the sample), never a numpy or zstd error naming nothing.
"""
import functools
import hashlib
import json

import numpy as np
import zstandard
from etils import epath

_SHAPE_DTYPES = {0: np.uint8, 1: np.uint16, 2: np.uint32, 3: np.uint64}
_VALUE_DTYPES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16", 32: "uint32", 33: "int32",
                 34: "float32", 64: "uint64", 65: "int64", 66: "float64"}
_VALUE_CODES = {v: k for k, v in _VALUE_DTYPES.items()}
# Hash algorithms in the order they are preferred when a shard lists several (fastest first).
_HASH_PREFERENCE = ("xxh3_64", "xxh64", "xxh128", "xxh3_128", "xxh32", "md5", "sha1", "sha256")
_SCALARS = {"uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16", "float32",
            "float64"}


class MdsError(ValueError):
    """A shard or sample that cannot be read as it should (corrupt, truncated, wrong hash); names the file."""


def file_hash(algo: str, data: bytes) -> str:
    """The hex digest mosaicml-streaming writes into index.json for `algo` (hashlib's or xxhash's)."""
    if algo.startswith("xxh"):
        import xxhash
        return getattr(xxhash, algo)(data).hexdigest()
    return hashlib.new(algo, data).hexdigest()


def _checkable(hashes: dict):
    """The listed (algo, digest) to check: the first of _HASH_PREFERENCE, else any hashlib knows; None if none."""
    for algo in _HASH_PREFERENCE + tuple(sorted(hashes)):
        if algo in hashes and (algo.startswith("xxh") or algo in hashlib.algorithms_available):
            return algo, hashes[algo]
    return None


def _fixed_size(encoding: str):
    if encoding in _SCALARS:
        return np.dtype(encoding).itemsize
    if encoding == "int":
        return 8
    parts = encoding.split(":")
    if parts[0] == "ndarray" and len(parts) == 3:
        return int(np.prod([int(d) for d in parts[2].split(",")])) * np.dtype(parts[1]).itemsize
    return None


def decode_value(encoding: str, data: bytes):
    """Decodes one column value."""
    if encoding == "str":
        return data.decode("utf-8")
    if encoding == "bytes":
        return bytes(data)
    if encoding == "int":
        return int(np.frombuffer(data, np.int64)[0])
    if encoding in _SCALARS:
        return np.frombuffer(data, encoding)[0]
    if encoding == "json":
        return json.loads(data.decode("utf-8"))
    parts = encoding.split(":")
    if parts[0] != "ndarray":
        raise ValueError(f"MDS encoding {encoding!r} is not supported by ettin_jax.data.mds")
    i = 0
    if len(parts) >= 2 and parts[1]:
        dtype = parts[1]
    else:
        dtype = _VALUE_DTYPES[data[0]]
        i = 1
    if len(parts) == 3:
        shape = tuple(int(d) for d in parts[2].split(","))
    else:
        byte = data[i]
        ndim, shape_dtype = byte >> 2, _SHAPE_DTYPES[byte & 3]
        width = ndim * np.dtype(shape_dtype).itemsize
        shape = tuple(int(d) for d in np.frombuffer(data[i + 1:i + 1 + width], shape_dtype))
        i += 1 + width
    return np.frombuffer(data[i:], dtype).reshape(shape)


def encode_value(encoding: str, value) -> bytes:
    """Encodes one column value (the inverse of `decode_value`)."""
    if encoding == "str":
        return value.encode("utf-8")
    if encoding == "bytes":
        return bytes(value)
    if encoding == "int":
        return np.int64(value).tobytes()
    if encoding in _SCALARS:
        return np.asarray(value, encoding).tobytes()
    if encoding == "json":
        return json.dumps(value).encode("utf-8")
    parts = encoding.split(":")
    if parts[0] != "ndarray":
        raise ValueError(f"MDS encoding {encoding!r} is not supported by ettin_jax.data.mds")
    value = np.asarray(value)
    out = []
    if len(parts) >= 2 and parts[1]:
        value = value.astype(parts[1], copy=False)
    else:
        out.append(bytes([_VALUE_CODES[value.dtype.name]]))
    if len(parts) < 3:
        shape = np.asarray(value.shape, np.int64)
        code = next(c for c, dt in _SHAPE_DTYPES.items() if shape.max() < np.iinfo(dt).max)
        out.append(bytes([(value.ndim << 2) | code]))
        out.append(shape.astype(_SHAPE_DTYPES[code]).tobytes())
    out.append(value.tobytes())
    return b"".join(out)


class MdsWriter:
    """Writes an MDS dataset folder (for tests and for exporting pre-tokenized data).

    with MdsWriter(out, {"id": "str", "input_ids": "ndarray:uint32"}, compression="zstd") as w:
        w.write({"id": "doc-0", "input_ids": np.array([...], np.uint32)})
    """

    def __init__(self, out, columns: dict, compression: str | None = "zstd", size_limit: int = 1 << 26,
                 hashes=("xxh64",)):
        self.out = epath.Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.names = sorted(columns)  # the upstream writer orders columns by name
        self.encodings = [columns[n] for n in self.names]
        self.sizes = [_fixed_size(e) for e in self.encodings]
        self.compression = compression
        self.size_limit = size_limit
        self.hashes = list(hashes)  # listed per file in index.json, as mosaicml-streaming's `hashes` argument
        self.samples, self.nbytes, self.shards = [], 0, []

    def write(self, sample: dict):
        """Adds one sample (a dict with every column)."""
        datas = [encode_value(e, sample[n]) for n, e in zip(self.names, self.encodings)]
        head = np.asarray([len(d) for d, s in zip(datas, self.sizes) if s is None], np.uint32).tobytes()
        blob = head + b"".join(datas)
        if self.samples and self.nbytes + len(blob) > self.size_limit:
            self._flush()
        self.samples.append(blob)
        self.nbytes += len(blob)

    def _flush(self):
        n = len(self.samples)
        offsets = np.cumsum([0] + [len(s) for s in self.samples]).astype(np.int64) + 4 + 4 * (n + 1)
        raw = np.uint32(n).tobytes() + offsets.astype(np.uint32).tobytes() + b"".join(self.samples)
        basename = f"shard.{len(self.shards):05d}.mds"
        raw_info = {"basename": basename, "bytes": len(raw), "hashes": {a: file_hash(a, raw) for a in self.hashes}}
        zip_info = None
        if self.compression:
            algo = self.compression.split(":")[0]
            if algo != "zstd":
                raise ValueError(f"MDS compression {self.compression!r}: only zstd is supported")
            level = int(self.compression.split(":")[1]) if ":" in self.compression else 3
            packed = zstandard.ZstdCompressor(level=level).compress(raw)
            (self.out / (basename + ".zstd")).write_bytes(packed)
            zip_info = {"basename": basename + ".zstd", "bytes": len(packed),
                        "hashes": {a: file_hash(a, packed) for a in self.hashes}}
        else:
            (self.out / basename).write_bytes(raw)
        self.shards.append({"column_encodings": self.encodings, "column_names": self.names,
                            "column_sizes": self.sizes, "compression": self.compression, "format": "mds",
                            "hashes": self.hashes, "raw_data": raw_info, "samples": n, "size_limit": self.size_limit,
                            "version": 2, "zip_data": zip_info})
        self.samples, self.nbytes = [], 0

    def close(self):
        """Flushes the last shard and writes index.json."""
        if self.samples:
            self._flush()
        (self.out / "index.json").write_text(json.dumps({"shards": self.shards, "version": 2}, sort_keys=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()


class MdsReader:
    """Random access to the samples of one or more MDS folders (each with an index.json).

    `reader[i]` raises MdsError naming the shard file (and sample) when the shard's hash, layout or the sample's
    encoding is wrong; a shard that failed once fails again at once (it is not re-read for each of its samples).
    `reader.where(i)` names sample i ("<shard file> sample j") for logs.
    """

    def __init__(self, folders, verify_hashes: bool = True):
        self.verify_hashes = verify_hashes
        self.shards = []  # (folder, shard info)
        for folder in folders:
            folder = epath.Path(folder)
            try:
                index = json.loads((folder / "index.json").read_text())
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise MdsError(f"{folder}/index.json is not a readable MDS index ({e})") from None
            if not isinstance(index, dict) or index.get("version") != 2:
                raise MdsError(f"{folder}/index.json: MDS index version "
                               f"{index.get('version') if isinstance(index, dict) else None}, expected 2")
            for shard in index.get("shards", []):
                if shard.get("format") != "mds":
                    raise MdsError(f"{folder}/index.json: shard format {shard.get('format')!r}, expected 'mds'")
                self.shards.append((folder, shard))
        self.cumulative = np.cumsum([0] + [s["samples"] for _, s in self.shards])
        self._failed = {}  # shard k -> MdsError message

    def __len__(self) -> int:
        return int(self.cumulative[-1])

    def _locate(self, i: int):
        k = int(np.searchsorted(self.cumulative, i, side="right")) - 1
        return k, i - int(self.cumulative[k])

    def _file(self, k: int):
        """(path, info) of the file shard k is read from: the raw file if present, else the zstd one."""
        folder, shard = self.shards[k]
        raw_path = folder / shard["raw_data"]["basename"]
        if raw_path.exists() or not shard.get("zip_data"):
            return raw_path, shard["raw_data"]
        return folder / shard["zip_data"]["basename"], shard["zip_data"]

    def where(self, i: int) -> str:
        """Sample i as "<shard file> sample j" (for logs)."""
        k, j = self._locate(i)
        return f"{self._file(k)[0]} sample {j}"

    @functools.lru_cache(maxsize=2)
    def _shard_bytes(self, k: int) -> bytes:
        if k in self._failed:
            raise MdsError(self._failed[k])
        try:
            return self._read_shard(k)
        except MdsError as e:
            self._failed[k] = str(e)
            raise

    def _read_shard(self, k: int) -> bytes:
        _, shard = self.shards[k]
        path, info = self._file(k)
        if not path.exists():
            raise MdsError(f"MDS shard {path} is missing (listed in {path.parent}/index.json)")
        data = path.read_bytes()
        listed = _checkable(info.get("hashes") or {}) if self.verify_hashes else None
        if listed:
            algo, want = listed
            got = file_hash(algo, data)
            if got != want:
                raise MdsError(f"MDS shard {path}: {algo} checksum mismatch (index.json lists {want}, the file "
                               f"hashes to {got}): the file is corrupt; copy it again, or set "
                               f"--config.data.on_bad_sample=skip to skip its samples")
        if info is not shard["raw_data"]:
            try:
                data = zstandard.ZstdDecompressor().decompress(data, max_output_size=shard["raw_data"]["bytes"])
            except zstandard.ZstdError as e:
                raise MdsError(f"MDS shard {path} is not a readable zstd file ({e})") from None
        self._check_layout(data, shard, path)
        return data

    @staticmethod
    def _check_layout(data: bytes, shard: dict, path):
        """The shard's sample count, offset table and size agree with each other and with index.json."""
        n = shard["samples"]
        head = 4 + 4 * (n + 1)
        problem = None
        if len(data) != shard["raw_data"].get("bytes", len(data)):
            problem = f"{len(data)} bytes, index.json says {shard['raw_data']['bytes']}"
        elif len(data) < head:
            problem = f"{len(data)} bytes, too short for the offset table of {n} samples"
        elif int(np.frombuffer(data, np.uint32, count=1)[0]) != n:
            problem = f"sample count {int(np.frombuffer(data, np.uint32, count=1)[0])}, index.json says {n}"
        else:
            offsets = np.frombuffer(data, np.uint32, count=n + 1, offset=4).astype(np.int64)
            if offsets[0] != head or offsets[-1] != len(data) or (np.diff(offsets) < 0).any():
                problem = "corrupt offset table (offsets out of order or outside the file)"
        if problem:
            raise MdsError(f"MDS shard {path}: {problem}")

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"MDS sample {i} out of range [0, {len(self)})")
        k, j = self._locate(i)
        data = self._shard_bytes(k)
        begin, end = np.frombuffer(data, np.uint32, count=2, offset=4 + 4 * j)
        sample = memoryview(data)[begin:end]
        shard = self.shards[k][1]
        try:
            sizes, idx = [], 0
            for size in shard["column_sizes"]:
                if size is None:
                    size = int(np.frombuffer(sample, np.uint32, count=1, offset=idx)[0])
                    idx += 4
                sizes.append(size)
            if idx + sum(sizes) != len(sample):
                raise ValueError(f"column sizes {sizes} do not add up to the sample's {len(sample)} bytes")
            out = {}
            for name, encoding, size in zip(shard["column_names"], shard["column_encodings"], sizes):
                out[name] = decode_value(encoding, bytes(sample[idx:idx + size]))
                idx += size
        except (ValueError, UnicodeDecodeError, KeyError, IndexError, TypeError) as e:
            raise MdsError(f"{self.where(i)} cannot be decoded ({type(e).__name__}: {e})") from None
        return out
