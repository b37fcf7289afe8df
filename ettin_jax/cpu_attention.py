"""Masked softmax attention for fp32 training on CPU in one native kernel, forward and backward.

On XLA:CPU the tiled attention (`attention.tiled_core`, `blocked_attention`) runs each tile's products as separate
GEMMs with the softmax's passes (mask, max, exp, sum, rescale; in the backward pass the recomputed probabilities,
dS and the key gradients' accumulation) between them, on heads-major copies of q, k, v and of their gradients.
`native/attention.cc` (XLA FFI handlers) does flash attention per (batch, head) on the [B, T, H, D] layout itself:
64 x 64 blocks, the online softmax on the block in cache, only the blocks the band reaches (docs/perf.md item 16).

Used by `attention.self_attention` (impl 'auto') for fp32 q, k, v with T a multiple of 64 and D of 32, on one
device (a custom call is not partitioned), on an AVX-512 CPU, where the handler built (`native_build`;
ETTIN_JAX_NATIVE=0 turns it off). Everything else takes the XLA paths.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ettin_jax import cpu_dots, native_build

FORWARD, BACKWARD = "ettin_attention_fwd", "ettin_attention_bwd"


@functools.cache
def available() -> bool:
    """Whether the handlers are built and registered for this process's CPU (decided once per process)."""
    return "avx512f" in cpu_dots.cpu_flags() and native_build.register(
        "attention", ((FORWARD, "AttentionForward"), (BACKWARD, "AttentionBackward")))


def usable(q, k, v) -> bool:
    """Whether `attention` applies to these operands here (decided at trace time)."""
    return (all(a.dtype == jnp.float32 for a in (q, k, v)) and q.ndim == 4 and q.shape == k.shape == v.shape
            and q.shape[1] % 64 == 0 and q.shape[1] > 0 and q.shape[3] % 32 == 0 and native_build.one_device()
            and native_build.enabled() and available())


def _attrs(band):
    back, ahead = band
    return dict(back=np.int64(-1 if back is None else back), ahead=np.int64(-1 if ahead is None else ahead))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention(q, k, v, segment_ids, band):
    """Self-attention of q, k, v [B, T, H, D] (fp32) within segments and the (back, ahead) band, as
    `attention.reference_attention` with q_seg = k_seg = segment_ids [B, T]."""
    return _forward(q, k, v, segment_ids, band)[0]


def _forward(q, k, v, segment_ids, band):
    if not available():
        raise RuntimeError("the native attention is not available here (needs an AVX-512 CPU and g++; see the "
                           "logged warning); check cpu_attention.usable() first")
    b, t, h, _ = q.shape
    out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, h, t), jnp.float32))
    seg = segment_ids.astype(jnp.int32)
    o, lse = jax.ffi.ffi_call(FORWARD, out, vmap_method="sequential")(q, k, v, seg, **_attrs(band))
    return o, (q, k, v, seg, o, lse)


def _backward(band, res, do):
    q, k, v, seg, o, lse = res
    out = tuple(jax.ShapeDtypeStruct(q.shape, jnp.float32) for _ in range(3))
    dq, dk, dv = jax.ffi.ffi_call(BACKWARD, out, vmap_method="sequential")(
        q, k, v, seg, o, lse, do.astype(jnp.float32), **_attrs(band))
    return dq, dk, dv, None


attention.defvjp(_forward, _backward)
