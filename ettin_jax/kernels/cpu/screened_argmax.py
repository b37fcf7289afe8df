"""The exact argmax of the tied decoder's logits for greedy decoding on CPU, reading half the bytes.

A decoding step on CPU streams every weight once (docs/perf.md item 12): at the 150m the tied decoder is 155 MB of
the 593 MB a token, ~5 ms of ~22. Greedy decoding needs only the argmax of h . e_i + bias_i, not the logits, so
`native/screened_argmax.cc` (an XLA FFI handler) scores every row from a bf16 copy of the embedding (77 MB), with a
rigorous per-row bound on the error of that score (the bf16 roundings of h and e_i, Cauchy-Schwarz, plus the fp32
summation error), and recomputes from the fp32 rows only those whose bound reaches the best lower bound (a handful
of the 50,368). The result is the argmax of the exact logits, the same token the full fp32 product gives (up to two
logits equal to fp32 rounding, where any two fp32 implementations may differ). XLA:CPU itself cannot do this
faster: its bf16 matrix-vector product is conversion-bound (docs/perf.md item 12).

The handler is compiled on first use and cached (`kernels/cpu/build.py`). Where that fails (no compiler, another
platform), `available()` is False and decoding uses the plain product; ETTIN_JAX_NATIVE=0 turns it off.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ettin_jax.kernels.cpu import build

TARGET, PREPARE = "ettin_screened_argmax", "ettin_screen_prepare"


def available() -> bool:
    """Whether the handler is built and registered for this process's CPU backend (decided once per process)."""
    return build.register("screened_argmax", ((TARGET, "ScreenedArgmax"), (PREPARE, "ScreenPrepare")))


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
