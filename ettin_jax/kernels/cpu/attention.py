"""Masked softmax attention with RoPE for fp32 training on CPU in one native kernel, forward and backward.

On XLA:CPU the tiled attention (`attention.tiled_core`, `blocked_attention`) runs each tile's products as separate
GEMMs with the softmax's passes (mask, max, exp, sum, rescale; in the backward pass the recomputed probabilities,
dS and the key gradients' accumulation) between them, on heads-major copies of q, k, v and of their gradients, after
the q/k/v split and RoPE (and their transposes in the backward pass) as further passes. `native/attention.cc` (XLA
FFI handlers) does it all per (batch, head) from the Wqkv projection's output itself: RoPE while packing the rows,
flash attention over 64 x 64 blocks with the online softmax on the block in cache and only the blocks the band
reaches, and the gradient written as d(qkv) (docs/perf.md item 16).

Used by the model's attention (impl 'auto') for fp32 with T a multiple of 64 and head_dim of 32, on one device (a
custom call is not partitioned), on an AVX-512 CPU, where the handler built (`kernels/cpu/build.py`; ETTIN_JAX_NATIVE=0
turns it off). Everything else takes the XLA paths.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ettin_jax.kernels.cpu import build

FORWARD, BACKWARD = "ettin_attention_fwd", "ettin_attention_bwd"


def available() -> bool:
    """Whether the handlers are built and registered for this process's CPU (decided once per process)."""
    return build.register("attention", ((FORWARD, "AttentionForward"), (BACKWARD, "AttentionBackward")),
                                 cpu_flag="avx512f")


def usable(qkv) -> bool:
    """Whether `attention` applies to qkv [B, T, 3, H, D] here (decided at trace time)."""
    return (qkv.dtype == jnp.float32 and qkv.ndim == 5 and qkv.shape[2] == 3 and qkv.shape[1] % 64 == 0
            and qkv.shape[1] > 0 and qkv.shape[4] % 32 == 0 and build.one_device() and build.enabled()
            and available())


def _attrs(band):
    back, ahead = band
    return dict(back=np.int64(-1 if back is None else back), ahead=np.int64(-1 if ahead is None else ahead))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention(qkv, cos, sin, segment_ids, band):
    """Self-attention of qkv [B, T, 3, H, D] (fp32; q and k rotated by the RoPE tables cos, sin [B, T, D] as
    `model.apply_rope` does) within segments [B, T] and the (back, ahead) band: `attention.reference_attention`'s
    function of the rotated q, k and v. Returns [B, T, H, D]."""
    return _forward(qkv, cos, sin, segment_ids, band)[0]


def _forward(qkv, cos, sin, segment_ids, band):
    if not available():
        raise RuntimeError("the native attention is not available here (needs an AVX-512 CPU and g++; see the "
                           "logged warning); check attention.usable() first")
    b, t, _, h, d = qkv.shape
    out = (jax.ShapeDtypeStruct((b, t, h, d), jnp.float32), jax.ShapeDtypeStruct((b, h, t), jnp.float32))
    seg, cos, sin = segment_ids.astype(jnp.int32), cos.astype(jnp.float32), sin.astype(jnp.float32)
    o, lse = jax.ffi.ffi_call(FORWARD, out, vmap_method="sequential")(qkv, cos, sin, seg, **_attrs(band))
    return o, (qkv, cos, sin, seg, o, lse)


def _backward(band, res, do):
    qkv, cos, sin, seg, o, lse = res
    dqkv = jax.ffi.ffi_call(BACKWARD, jax.ShapeDtypeStruct(qkv.shape, jnp.float32), vmap_method="sequential")(
        qkv, cos, sin, seg, o, lse, do.astype(jnp.float32), **_attrs(band))
    return dqkv, None, None, None


attention.defvjp(_forward, _backward)
