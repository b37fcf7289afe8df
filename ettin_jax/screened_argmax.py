"""The exact argmax of the tied decoder's logits for greedy decoding on CPU, reading half the bytes.

A decoding step on CPU streams every weight once (docs/perf.md item 12): at the 150m the tied decoder is 155 MB of
the 593 MB a token, ~5 ms of ~22. Greedy decoding needs only the argmax of h . e_i + bias_i, not the logits, so
`native/screened_argmax.cc` (an XLA FFI handler) scores every row from a bf16 copy of the embedding (77 MB), with a
rigorous per-row bound on the error of that score (the bf16 roundings of h and e_i, Cauchy-Schwarz, plus the fp32
summation error), and recomputes from the fp32 rows only those whose bound reaches the best lower bound (a handful
of the 50,368). The result is the argmax of the exact logits, the same token the full fp32 product gives (up to two
logits equal to fp32 rounding, where any two fp32 implementations may differ). XLA:CPU itself cannot do this
faster: its bf16 matrix-vector product is conversion-bound (docs/perf.md item 12).

The handler is compiled on first use with the system's C++ compiler (`g++`, or $CXX) against jaxlib's FFI headers
into ~/.cache/ettin_jax (or $ETTIN_JAX_CACHE), keyed by the source, jaxlib's version and the CPU. Where that fails
(no compiler, another platform), `available()` is False and decoding uses the plain product; ETTIN_JAX_NATIVE=0
turns it off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from typing import Optional

import jax
import jax.numpy as jnp

from ettin_jax import cpu_dots

TARGET, PREPARE = "ettin_screened_argmax", "ettin_screen_prepare"
_SOURCE = os.path.join(os.path.dirname(__file__), "native", "screened_argmax.cc")


def _cpu_key() -> str:
    return platform.machine() + " ".join(sorted(cpu_dots.cpu_flags()))


def _build() -> Optional[str]:
    """Compiles the handler (once per source, jaxlib and CPU); returns the library's path or None, with the reason
    logged."""
    with open(_SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + jax.lib.__version__.encode() + _cpu_key().encode()).hexdigest()[:16]
    folder = os.environ.get("ETTIN_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ettin_jax")
    path = os.path.join(folder, f"screened_argmax_{key}.so")
    if os.path.isfile(path):
        return path
    compiler, tmp = os.environ.get("CXX", "g++"), None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        subprocess.run([compiler, "-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC", "-std=c++17",
                        f"-I{jax.ffi.include_dir()}", _SOURCE, "-o", tmp],
                       check=True, capture_output=True, text=True, timeout=300)
        os.replace(tmp, path)  # atomic: concurrent builders leave one complete library
        return path
    except (OSError, subprocess.SubprocessError) as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        detail = getattr(e, "stderr", "") or str(e)
        logging.warning("ettin_jax: the screened argmax could not be built (%s: %s); greedy decoding on CPU uses "
                        "the plain fp32 product", compiler, detail.strip()[-500:])
        return None


@functools.cache
def available() -> bool:
    """Whether the handler is built and registered for this process's CPU backend (decided once per process)."""
    if os.environ.get("ETTIN_JAX_NATIVE", "1") == "0" or jax.default_backend() != "cpu":
        return False
    path = _build()
    if path is None:
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(path)
    except OSError as e:  # a damaged cached library: say where it is, decode without it
        logging.warning("ettin_jax: could not load %s (%s); delete it to rebuild", path, e)
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.ScreenedArgmax), platform="cpu")
    jax.ffi.register_ffi_target(PREPARE, jax.ffi.pycapsule(lib.ScreenPrepare), platform="cpu")
    return True


def _require():
    if not available():
        raise RuntimeError("the screened argmax is not available here (not CPU, ETTIN_JAX_NATIVE=0, or the build "
                           "failed: see the logged warning); check screened_argmax.available() first")


def prepare(embedding: jax.Array) -> dict:
    """What the screen reads besides the fp32 rows: their bf16 copy, ||e_i|| and ||e_i - bf16(e_i)|| (rounded up)."""
    _require()
    v, h = embedding.shape
    out = (jax.ShapeDtypeStruct((v, h), jnp.bfloat16), jax.ShapeDtypeStruct((v,), jnp.float32),
           jax.ShapeDtypeStruct((v,), jnp.float32))
    low, norm, err = jax.ffi.ffi_call(PREPARE, out)(embedding.astype(jnp.float32))
    return dict(low=low, norm=norm, err=err)


def argmax(h: jax.Array, embedding: jax.Array, bias: jax.Array, screen: dict):
    """(argmax_i h . e_i + bias_i, rows recomputed in fp32) for features h [H] (fp32), embedding [V, H], bias [V].

    Returns (-1, -1) when h or a row's score is not finite (NaN or inf in the features, embedding or bias); the
    caller then takes the plain product's argmax.
    """
    _require()
    out = (jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
    return jax.ffi.ffi_call(TARGET, out)(h.astype(jnp.float32), screen["low"], embedding, bias, screen["norm"],
                                         screen["err"])
