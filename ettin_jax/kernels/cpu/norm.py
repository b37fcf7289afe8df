"""Scale-only LayerNorm's forward pass for fp32 on CPU, in one native pass over memory.

`model._layer_norm` on XLA:CPU computes the row mean and variance as two matrix-vector products (so that the
statistics stay [rows, 1]) with the centred squares written and read in between, then normalises: three reads of
x, a write and a read of [rows, H], and the output's write. `native/layer_norm.cc` reads each row once into L1 and
writes y once, returning the same y, mean and rstd (docs/perf.md item 20). Used by `model.layer_norm` for fp32 in
and out with H a multiple of 16, on one device (a custom call is not partitioned), on an AVX-512 CPU, where the
handler built (`kernels/cpu/build.py`; ETTIN_JAX_NATIVE=0 turns it off). The backward pass stays in XLA.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ettin_jax.kernels.cpu import build

TARGET = "ettin_layer_norm"


def available() -> bool:
    """Whether the handler is built and registered for this process's CPU (decided once per process)."""
    return build.register("layer_norm", ((TARGET, "LayerNorm"),), cpu_flag="avx512f")


def usable(x, scale, dtype) -> bool:
    """Whether `layer_norm` applies to x [..., H] with scale [H] and output dtype here (decided at trace time)."""
    return (x.dtype == jnp.float32 and jnp.dtype(dtype) == jnp.float32 and scale.dtype == jnp.float32
            and x.ndim >= 1 and x.shape[-1] % 16 == 0 and x.shape[-1] > 0 and scale.shape == (x.shape[-1],)
            and build.one_device() and build.enabled() and available())


def layer_norm(x, scale, eps: float):
    """(y, mean, rstd) of x [..., H]: y = (x - mean) * rstd * scale, mean and rstd [..., 1]."""
    if not available():
        raise RuntimeError("the native layer norm is not available here (needs an AVX-512 CPU and g++; see the "
                           "logged warning); check norm.usable() first")
    lead, h = x.shape[:-1], x.shape[-1]
    rows = int(np.prod(lead)) if lead else 1
    out = (jax.ShapeDtypeStruct((rows, h), jnp.float32), jax.ShapeDtypeStruct((rows, 1), jnp.float32),
           jax.ShapeDtypeStruct((rows, 1), jnp.float32))
    y, mean, rstd = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(
        x.reshape(rows, h), scale, eps=np.float32(eps))
    return y.reshape(x.shape), mean.reshape(*lead, 1), rstd.reshape(*lead, 1)
