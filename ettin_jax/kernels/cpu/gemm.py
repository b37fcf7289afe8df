"""fp32 projections on CPU in a native register-tiled matrix product, forward and both gradients.

XLA:CPU runs the model's projection products (tokens x a hidden size of 256-1152 against a weight of a few
hundred to a few thousand columns) in Eigen at 130-200 GFLOP/s on this project's 2-core AVX-512 host, well under
the 2048-square matmul's rate, and the weight gradient's x^T g, which contracts the tokens, slowest of all.
`native/gemm.cc` is one BLIS-style product (packed slivers and panels, a 12 x 32 AVX-512 register tile) for the
three forms a projection needs, each read from the row-major operands as they are (docs/perf.md item 17):

    y  = x W        [T, K] x [K, N]
    dx = g W^T      [T, N] x [K, N]^T
    dW = x^T g      [T, K]^T x [T, N]

Used by `model.Dense` for fp32 with widths (K and N) that are multiples of 32 and at least MIN_ROWS rows (not for
decoding's few), on one device (a custom call is not partitioned), on an AVX-512 CPU, where the handler built
(`kernels/cpu/build.py`; ETTIN_JAX_NATIVE=0 turns it off). Everything else takes jnp.dot.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ettin_jax.kernels.cpu import build

TARGET = "ettin_gemm"


def available() -> bool:
    """Whether the handler is built and registered for this process's CPU (decided once per process)."""
    return build.register("gemm", ((TARGET, "Gemm"),), cpu_flag="avx512f")


MIN_ROWS = 256  # fewer rows (decoding, short prompts): the weight's packing would cost more than it saves


def usable(x, kernel) -> bool:
    """Whether `dense` applies to x [..., K] and kernel [K, N] here (decided at trace time)."""
    return (x.dtype == jnp.float32 and kernel.dtype == jnp.float32 and kernel.ndim == 2 and x.ndim >= 1
            and x.shape[-1] == kernel.shape[0] and kernel.shape[0] % 32 == 0 and kernel.shape[1] % 32 == 0
            and x.size // max(x.shape[-1], 1) >= MIN_ROWS and build.one_device() and build.enabled()
            and available())


def product(lhs, rhs, form: int):
    """The fp32 product of two matrices: form 0 lhs rhs, 1 lhs rhs^T, 2 lhs^T rhs."""
    if not available():
        raise RuntimeError("the native gemm is not available here (needs an AVX-512 CPU and g++; see the logged "
                           "warning); check gemm.usable() first")
    rows = {0: lhs.shape[0], 1: lhs.shape[0], 2: lhs.shape[1]}[form]
    cols = {0: rhs.shape[1], 1: rhs.shape[0], 2: rhs.shape[1]}[form]
    out = jax.ShapeDtypeStruct((rows, cols), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(lhs, rhs, form=np.int64(form))


@jax.custom_vjp
def dense(x, kernel):
    """x [..., K] times kernel [K, N], fp32: [..., N]."""
    return _forward(x, kernel)[0]


def _forward(x, kernel):
    y = product(x.reshape(-1, x.shape[-1]), kernel, 0)
    return y.reshape(*x.shape[:-1], kernel.shape[1]), (x, kernel)


def _backward(res, g):
    x, kernel = res
    g2 = g.reshape(-1, g.shape[-1]).astype(jnp.float32)
    dx = product(g2, kernel, 1).reshape(x.shape)
    dw = product(x.reshape(-1, x.shape[-1]), g2, 2)
    return dx, dw


dense.defvjp(_forward, _backward)
