"""The kernel seam: which implementation computes an op, for the platform the step is compiled for, at its shapes
and dtypes. The model (`ettin_jax.model`) and the objectives say *what* is computed and call these functions; the
choices live here and nowhere else.

The platform is `platform()`: the devices of the mesh the step is traced under (`jax.set_mesh`), never this host's
default backend, so a step traced on a CPU host for a TPU topology (`ettin compile`) lowers the TPU paths.

    op                          tpu                  gpu                    cpu
    dense (projections)         jnp.dot              jnp.dot                cpu/gemm (fp32, one AVX-512 device),
                                                                            cpu/dots (bf16 with bf16 units), jnp.dot
    layer_norm statistics       jnp                  jnp                    cpu/norm (fp32, one AVX-512 device),
                                                                            else means as products
    attention from the fused    splash (any length,  cuDNN (blocked for    cpu/attention (fp32, one AVX-512 device,
      Wqkv output               padded inside)       two-sided windows)     T % 64 == 0), else xla_attention
    decoder cross-entropy       cross_entropy        cross_entropy          cpu/fused_ce (fp32, one AVX-512 device)
    tied decoder logits         dot_general          dot_general            cpu/dots (bf16 with bf16 units)

Everything under `cpu/` is native code for XLA:CPU (built with g++ on first use); a TPU or GPU user never needs it.
Adding a kernel is one module here plus one line in the function that dispatches its op.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from ettin_jax.attention import Band, reference_attention
from ettin_jax.kernels import cudnn, splash, xla_attention
from ettin_jax.kernels.cpu import attention as cpu_attention
from ettin_jax.kernels.cpu import dots as cpu_dots
from ettin_jax.kernels.cpu import gemm as cpu_gemm
from ettin_jax.kernels.cpu import norm as cpu_norm
from ettin_jax.kernels.cross_entropy import decoder_cross_entropy  # noqa: F401 (the seam's CE entry point)
from ettin_jax.kernels.platform import platform

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------------------------ products and norms


def dense(x: Array, kernel: Array) -> Array:
    """x [..., K] (already in the compute dtype) times kernel [K, N] (fp32 parameters), in x's dtype."""
    if cpu_dots.enabled(x.dtype):
        return cpu_dots.dense(x, kernel)
    if cpu_gemm.usable(x, kernel):  # fp32 x and kernel only
        return cpu_gemm.dense(x, kernel)
    return jnp.dot(x, kernel.astype(x.dtype))


def tied_logits(features: Array, embedding: Array) -> Array:
    """features [..., H] @ embedding [V, H]^T in features' dtype, fp32 logits [..., V]."""
    if cpu_dots.enabled(features.dtype):
        return cpu_dots.decode(features, embedding)
    emb = embedding.astype(features.dtype)
    # Contract over the embedding's feature dim directly: `x @ E.T` makes XLA:CPU copy the transposed V x H table
    # on every call (~100 ms per decode step at 150m).
    return jax.lax.dot_general(features, emb, (((features.ndim - 1,), (1,)), ((), ()))).astype(jnp.float32)


def layer_norm_forward(x: Array, scale: Array, eps: float, dtype) -> Optional[tuple]:
    """(y, mean, rstd) from a native pass where one applies (fp32 on one AVX-512 CPU device), else None."""
    if cpu_norm.usable(x, scale, dtype):
        return cpu_norm.layer_norm(x, scale, eps)
    return None


def row_mean(x: Array) -> Array:
    """Mean over the last axis, [..., 1], in fp32. On CPU as a matrix-vector product: XLA:CPU's reduction fusions
    hand the statistics on already broadcast to [..., H] (one more [tokens, H] array each, kept for the backward
    pass), a product's output stays [..., 1]."""
    if platform() != "cpu":
        return x.mean(-1, keepdims=True)
    ones = jnp.full((x.shape[-1], 1), 1.0 / x.shape[-1], jnp.float32)
    return jnp.dot(x, ones, precision=_HIGHEST)


def weighted_row_sum(a: Array, w: Array) -> Array:
    """sum_rows w[row] * a[row, :] over every axis but the last ([..., H] and [..., 1] -> [H]), in fp32. On CPU as a
    vector-matrix product: XLA:CPU reduces over the major axis many times slower than it runs the product."""
    a2, w1 = a.reshape(-1, a.shape[-1]), w.reshape(-1)
    if platform() != "cpu":
        return jnp.sum(a2 * w1[:, None], axis=0)
    return jnp.dot(w1, a2, precision=_HIGHEST)


def materialize(table: Array) -> Array:
    """A cheap elementwise table (RoPE's cos and sin [..., D]) computed once rather than in every consumer.

    On CPU it leaves through a product with the identity (exact in fp32): otherwise XLA:CPU fuses the cheap-looking
    cos and sin into every consumer and evaluates them per head, per q and k, per layer and again in the backward
    pass (~16 ms a layer in the 150m forward at 8 x 512); it drops an optimization barrier before fusion, so a
    barrier does not do this. Elsewhere the table is returned as it is.
    """
    if platform() != "cpu":
        return table
    return jnp.dot(table, jnp.eye(table.shape[-1], dtype=table.dtype), precision=_HIGHEST)


def tie(a: Array, b: Array) -> Array:
    """`a`, made a function of `b` on CPU (a + 0 * b), so that XLA:CPU neither CSEs a backward-pass term of `a` with
    the forward pass nor schedules it there and keeps it until the backward pass (an optimization barrier does not
    stop this on XLA:CPU). `a` itself elsewhere."""
    if platform() != "cpu":
        return a
    return a + 0.0 * b


# -------------------------------------------------------------------------------------------------- attention

def _chunked(q, k, v, *, segment_ids, band, block):
    if band[1] != 0:  # not causal: query chunks would skip no keys; one tiled call
        return xla_attention.tiled_attention(q, k, v, q_seg=segment_ids, k_seg=segment_ids, band=band)
    return xla_attention.chunked_attention(q, k, v, segment_ids=segment_ids, band=band)


# name -> self-attention of q, k, v [B, T, H, D] (keyword-only: segment_ids [B, T], band, block). A new kernel is one
# module and one entry here; `resolve_impl` says where 'auto' uses which.
ATTENTION = {
    "xla": lambda q, k, v, *, segment_ids, band, block: reference_attention(
        q, k, v, q_seg=segment_ids, k_seg=segment_ids, band=band),
    "blocked": lambda q, k, v, *, segment_ids, band, block: xla_attention.blocked_attention(
        q, k, v, segment_ids=segment_ids, band=band, block=block),
    "chunked": _chunked,
    "cudnn": lambda q, k, v, *, segment_ids, band, block: cudnn.cudnn_attention(
        q, k, v, segment_ids=segment_ids, band=band),
    "splash": lambda q, k, v, *, segment_ids, band, block: splash.splash_attention(
        q, k, v, segment_ids=segment_ids, band=band),
}


def resolve_impl(impl: str, band: Band, t: int, *, block: int = 64, target: Optional[str] = None) -> str:
    """The implementation one layer uses.

    auto: TPU -> splash for every layer (rows of any length: padded inside to the kernel's tiles); GPU -> cuDNN,
    except bidirectional sliding-window layers (cuDNN has no right window), which go blocked; CPU -> blocked for
    sliding-window layers of rows longer than two blocks, query-chunked for the rest. 'cudnn' and 'blocked' likewise
    fall back where they cannot express a band. target: the platform (default: `platform()`).
    """
    if impl != "auto" and impl not in ATTENTION:
        raise ValueError(f"unknown attention implementation {impl!r}; expected one of auto, {', '.join(ATTENTION)}")
    bounded = band[0] is not None and band[1] is not None
    if impl == "auto":
        target = target or platform()
        if target == "tpu":
            return "splash"
        if target == "gpu":
            impl = "cudnn"
        else:
            return "blocked" if bounded and t > 2 * block else "chunked"
    if impl == "cudnn" and (band[1] not in (None, 0)):
        return "blocked" if t > 2 * block else "xla"
    if impl == "blocked" and not bounded:
        return "xla"
    return impl


def self_attention(q, k, v, *, segment_ids, band: Band, impl: str = "auto", block: int = 64):
    """Training-time self-attention of q, k, v [B, T, H, D] (queries and keys the same packed rows).

    impl: 'auto' (see `resolve_impl`), 'xla' (always dense: `attention.reference_attention`), 'blocked' (blocked
    wherever the band is bounded), 'chunked' (the tiled core; causal bands in query chunks against the keys they
    reach), 'cudnn' (GPU), 'splash' (TPU), or any other name registered in `ATTENTION`.
    """
    impl = resolve_impl(impl, band, q.shape[1], block=block)
    return ATTENTION[impl](q, k, v, segment_ids=segment_ids, band=band, block=block)


def attention(qkv: Array, cos: Array, sin: Array, segment_ids: Array, band: Band, *, impl: str, block: int,
              rotate: Callable) -> Array:
    """Self-attention from the fused Wqkv output qkv [B, T, 3, H, D] -> [B, T, H, D].

    rotate(qkv, cos, sin) -> (q, k, v) is the model's split and RoPE; on one AVX-512 CPU device in fp32 ('auto')
    the native kernel applies RoPE itself while packing the rows, and attends, in one pass.
    """
    if impl == "auto" and cpu_attention.usable(qkv):
        return cpu_attention.attention(qkv, cos, sin, segment_ids, band)
    q, k, v = rotate(qkv, cos, sin)
    return self_attention(q, k, v, segment_ids=segment_ids, band=band, impl=impl, block=block)
