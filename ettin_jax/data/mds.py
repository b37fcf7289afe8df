"""A reader and a writer for MosaicML Streaming's MDS format (what Ettin's pre-tokenized shards use).

`mosaicml-streaming` is not a dependency: this is the subset the Ettin pools need. A dataset folder holds
`index.json` ({"version": 2, "shards": [...]}) and shards `shard.NNNNN.mds`, or `shard.NNNNN.mds.zstd` when
compressed. A shard is: uint32 sample count n; n + 1 uint32 byte offsets (from the start of the shard) of each
sample; then the samples. A sample is: one uint32 size per variable-size column, then the columns' bytes in
`column_names` order. Encodings read here: `str`, `bytes`, `int`, scalar dtypes, `json` and `ndarray[:dtype[:shape]]`
(dynamic dtype: one byte code; dynamic shape: one byte `ndim << 2 | shape_dtype_code`, then the shape).
"""
import functools
import json

import numpy as np
import zstandard
from etils import epath

_SHAPE_DTYPES = {0: np.uint8, 1: np.uint16, 2: np.uint32, 3: np.uint64}
_VALUE_DTYPES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16", 32: "uint32", 33: "int32",
                 34: "float32", 64: "uint64", 65: "int64", 66: "float64"}
_VALUE_CODES = {v: k for k, v in _VALUE_DTYPES.items()}
_SCALARS = {"uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16", "float32",
            "float64"}


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

    def __init__(self, out, columns: dict, compression: str | None = "zstd", size_limit: int = 1 << 26):
        self.out = epath.Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.names = sorted(columns)  # the upstream writer orders columns by name
        self.encodings = [columns[n] for n in self.names]
        self.sizes = [_fixed_size(e) for e in self.encodings]
        self.compression = compression
        self.size_limit = size_limit
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
        raw_info = {"basename": basename, "bytes": len(raw), "hashes": {}}
        zip_info = None
        if self.compression:
            algo = self.compression.split(":")[0]
            if algo != "zstd":
                raise ValueError(f"MDS compression {self.compression!r}: only zstd is supported")
            level = int(self.compression.split(":")[1]) if ":" in self.compression else 3
            packed = zstandard.ZstdCompressor(level=level).compress(raw)
            (self.out / (basename + ".zstd")).write_bytes(packed)
            zip_info = {"basename": basename + ".zstd", "bytes": len(packed), "hashes": {}}
        else:
            (self.out / basename).write_bytes(raw)
        self.shards.append({"column_encodings": self.encodings, "column_names": self.names,
                            "column_sizes": self.sizes, "compression": self.compression, "format": "mds",
                            "hashes": [], "raw_data": raw_info, "samples": n, "size_limit": self.size_limit,
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
    """Random access to the samples of one or more MDS folders (each with an index.json)."""

    def __init__(self, folders):
        self.shards = []  # (folder, shard info)
        for folder in folders:
            folder = epath.Path(folder)
            index = json.loads((folder / "index.json").read_text())
            if index.get("version") != 2:
                raise ValueError(f"{folder}/index.json: MDS index version {index.get('version')}, expected 2")
            for shard in index["shards"]:
                if shard.get("format") != "mds":
                    raise ValueError(f"{folder}/index.json: shard format {shard.get('format')!r}, expected 'mds'")
                self.shards.append((folder, shard))
        self.cumulative = np.cumsum([0] + [s["samples"] for _, s in self.shards])

    def __len__(self) -> int:
        return int(self.cumulative[-1])

    @functools.lru_cache(maxsize=2)
    def _shard_bytes(self, k: int) -> bytes:
        folder, shard = self.shards[k]
        raw_path = folder / shard["raw_data"]["basename"]
        if raw_path.exists():
            return raw_path.read_bytes()
        if not shard.get("zip_data"):
            raise FileNotFoundError(f"MDS shard {raw_path} is missing")
        packed = (folder / shard["zip_data"]["basename"]).read_bytes()
        return zstandard.ZstdDecompressor().decompress(packed, max_output_size=shard["raw_data"]["bytes"])

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"MDS sample {i} out of range [0, {len(self)})")
        k = int(np.searchsorted(self.cumulative, i, side="right")) - 1
        j = i - int(self.cumulative[k])
        data = self._shard_bytes(k)
        begin, end = np.frombuffer(data, np.uint32, count=2, offset=4 + 4 * j)
        sample = memoryview(data)[begin:end]
        shard = self.shards[k][1]
        sizes, idx = [], 0
        for size in shard["column_sizes"]:
            if size is None:
                size = int(np.frombuffer(sample, np.uint32, count=1, offset=idx)[0])
                idx += 4
            sizes.append(size)
        out = {}
        for name, encoding, size in zip(shard["column_names"], shard["column_encodings"], sizes):
            out[name] = decode_value(encoding, bytes(sample[idx:idx + size]))
            idx += size
        return out
