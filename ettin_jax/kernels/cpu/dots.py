"""bf16 matrix products that XLA:CPU hands to YNNPACK (AMX / AVX512-BF16 kernels) instead of upcasting them.

XLA:CPU runs a bf16 x bf16 -> fp32 dot in YNNPACK, on this project's host at 1.0-1.6 TFLOP/s (AMX), only when
both operands are row-major with the lhs contracting its last axis and the rhs its first or last
(`xla/backends/cpu/ynn_support.cc`, `IsDotSupportedByYnn`). Every other bf16 dot is upcast to fp32 and runs in
Eigen at 100-250 GFLOP/s, and so is any dot with a bf16 result. A plain `jnp.dot` of bf16 operands falls in the
second case, and so do half of the products of its autodiff transpose: the weight gradient x^T g contracts the
tokens, the major axis of both operands.

`dense` is a bias-free projection whose forward product and both backward products are of the first kind:

    y  = x W                 [T, K] x [K, N], fp32 accumulation, rounded to bf16
    dx = g W^T               [T, N] x [N, K] (the rhs contracting its last axis)
    dW = (x^T) g             [K, T] x [T, N], with x^T made row-major first

XLA lowers a transpose to a change of layout, which YNNPACK refuses (and which no barrier, pad or elementwise op
undoes), so x^T is made as a product: I_K x^T, the identity contracting against x's last axis, exact because every
product is a bf16 value times one and the sums add zeros. It costs 2 K^2 T FLOPs at YNNPACK's rate, against the
dot's 2 K N T: at the 17m's shapes, 0.5-1.5 ms against 30-40 ms for the upcast fp32 product it replaces.

One more XLA:CPU limit shapes this code: a bf16 x bf16 -> fp32 dot whose result XLA lays out transposed (a `.T`
of the product) is neither upcast nor handed to YNNPACK, and fails at run time ("Unsupported element type for
DotThunk::Execute"); so does a plain bf16 `x @ E.T` decoder's gradient in some graphs. `transposed_product` puts
such a transpose behind an optimization barrier, and `decode` replaces the tied decoder's plain product.

Used when the compute dtype is bf16, the backend is CPU and the processor has bf16 instructions (`enabled`): by
`model.Dense`, by `Ettin.decode` and by the fused cross-entropy's embedding gradient (`objectives`). Elsewhere the
plain products stay, which XLA:GPU and XLA:TPU already run on their matrix units. fp32 models are untouched.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ettin_jax.kernels.platform import platform

Array = jax.Array


def enabled(dtype) -> bool:
    """Whether products in this compute dtype should go through this module: bf16, on a CPU backend whose
    processor has bf16 instructions (AVX512-BF16, AMX-BF16 or Arm's BF16). Without them YNNPACK's bf16 kernels
    have no hardware to run on, and the identity products that make the transposes would be pure cost."""
    return jnp.dtype(dtype) == jnp.bfloat16 and platform() == "cpu" and cpu_has_bf16_units()


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset:
    """The instruction-set flags `cpuinfo` lists (x86 `flags`, Arm `Features` lines); empty where there is no such
    file."""
    try:
        with open(cpuinfo) as f:
            return frozenset(w for line in f if line.startswith(("flags", "Features")) for w in line.split(":", 1)[-1].split())
    except OSError:
        return frozenset()


def cpu_has_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether `cpuinfo` lists a bf16 instruction set (False where there is no such file)."""
    return bool(cpu_flags(cpuinfo) & {"avx512_bf16", "amx_bf16", "bf16"})


def _dot(a: Array, b: Array, contract: tuple[int, int]) -> Array:
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                               preferred_element_type=jnp.float32)


def transposed(x: Array) -> Array:
    """x^T ([C, R] from [R, C]) as a fresh row-major bf16 array: the product I_C x^T, exact."""
    return _dot(jnp.eye(x.shape[1], dtype=x.dtype), x, (1, 1)).astype(x.dtype)


@jax.custom_vjp
def dense(x: Array, kernel: Array) -> Array:
    """x [..., K] (bf16) times kernel [K, N] (any float dtype, used in bf16): [..., N] in bf16, fp32 accumulation."""
    return _forward(x, kernel)[0]


def _forward(x, kernel):
    k = kernel.astype(x.dtype)
    y = _dot(x.reshape(-1, x.shape[-1]), k, (1, 0)).astype(x.dtype)
    return y.reshape(*x.shape[:-1], k.shape[1]), (x, kernel)


def _backward(res, g):
    x, kernel = res
    k = kernel.astype(x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    g2 = g.reshape(-1, g.shape[-1]).astype(x.dtype)
    dx = _dot(g2, k, (1, 1)).astype(x.dtype).reshape(x.shape)
    dw = _dot(transposed(x2), g2, (1, 0)).astype(kernel.dtype)
    return dx, dw


dense.defvjp(_forward, _backward)


def transposed_product(a_t: Array, b: Array) -> Array:
    """(a_t b)^T in fp32, where a_t [K, T] and b [T, N] are row-major bf16: the product [K, N] in YNNPACK, then
    transposed to [N, K] behind an optimization barrier. Without the barrier XLA lays the product out transposed
    instead of copying it, and that dot fails at run time (see the module docstring)."""
    return jax.lax.optimization_barrier(_dot(a_t, b, (1, 0))).T


@jax.custom_vjp
def decode(x: Array, embedding: Array) -> Array:
    """The tied decoder's logits x E^T: x [..., H] (bf16) against embedding [V, H] (used in bf16), fp32 [..., V]."""
    return _decode_forward(x, embedding)[0]


def _decode_forward(x, embedding):
    y = _dot(x.reshape(-1, x.shape[-1]), embedding.astype(x.dtype), (1, 1))
    return y.reshape(*x.shape[:-1], embedding.shape[0]), (x, embedding)


def _decode_backward(res, g):
    x, embedding = res
    x2 = x.reshape(-1, x.shape[-1])
    g2 = g.reshape(-1, g.shape[-1]).astype(x.dtype)
    dx = _dot(g2, embedding.astype(x.dtype), (1, 0)).astype(x.dtype).reshape(x.shape)
    # dE = g^T x [V, H]: made as (x^T g)^T, transposing the [T, H] side (2 H^2 T FLOPs) instead of the [T, V] one.
    return dx, transposed_product(transposed(x2), g2).astype(embedding.dtype)


decode.defvjp(_decode_forward, _decode_backward)
