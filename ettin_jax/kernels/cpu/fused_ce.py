"""The tied decoder's cross-entropy with its gradients in one native kernel, for fp32 training on CPU.

`kernels.decoder_cross_entropy` computes, in its forward-with-gradients pass, per-row CE and correctness and
the gradients of the weighted CE sum with respect to the features, the tied embedding and the bias, a chunk of
rows at a time (three GEMMs per chunk and ~8 elementwise passes over the [rows, 50368] logits between them). On
an x86 CPU with AVX-512, `native/fused_ce.cc` (an XLA FFI handler) does the same computation with the softmax
done on cache-resident vocabulary chunks, so the logits make one trip to memory: 18-30% faster than XLA on the
CE alone (benchmarks/fused_ce.py; docs/perf.md item 15). It agrees with the XLA path to fp32 rounding (loss to 7
digits, gradients within ~3e-6); `correct` is exact.

Used (`usable`) for fp32 features, embedding and bias, a width that is a multiple of 64, one device (the mesh set
by `jax.set_mesh` has one device, or there is no mesh and one device: a custom call is not partitioned, so under
a mesh of several devices the XLA path is used), AVX-512, and a handler that built (`kernels/cpu/build.py`;
ETTIN_JAX_NATIVE=0 turns it off). Everything else takes the XLA path.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ettin_jax.kernels.cpu import build

TARGET = "ettin_fused_ce"
ROWS = 32  # the kernel's row multiple: callers' rows are padded with weight-0 rows


def available() -> bool:
    """Whether the handler is built and registered for this process's CPU (decided once per process)."""
    return build.register("fused_ce", ((TARGET, "FusedCe"),), cpu_flag="avx512f")


def usable(x, embedding, bias) -> bool:
    """Whether `cross_entropy` applies to these operands here (decided at trace time)."""
    return (all(a.dtype == jnp.float32 for a in (x, embedding, bias)) and x.ndim == 2 and x.shape[1] % 64 == 0
            and x.shape[0] > 0 and build.one_device() and build.enabled() and available())


def cross_entropy(x, embedding, bias, labels, weights):
    """(ce [N], correct [N], dx [N, H], d_embedding [V, H], d_bias [V]): per-row CE and [label is a max], and the
    gradients of sum_r weights_r ce_r, for features x [N, H], embedding [V, H], bias [V], labels [N], weights [N]."""
    if not available():
        raise RuntimeError("the native fused CE is not available here (needs an AVX-512 CPU and g++; see the "
                           "logged warning); check fused_ce.usable() first")
    n, h = x.shape
    v = embedding.shape[0]
    pad = (-n) % ROWS
    labels, weights = labels.astype(jnp.int32), weights.astype(jnp.float32)
    if pad:
        x, labels, weights = jnp.pad(x, ((0, pad), (0, 0))), jnp.pad(labels, (0, pad)), jnp.pad(weights, (0, pad))
    f32 = jnp.float32
    out = (jax.ShapeDtypeStruct((n + pad,), f32), jax.ShapeDtypeStruct((n + pad,), f32),
           jax.ShapeDtypeStruct((n + pad, h), f32), jax.ShapeDtypeStruct((v, h), f32),
           jax.ShapeDtypeStruct((v,), f32))
    ce, correct, dx, d_emb, d_bias = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(
        x, embedding, bias, labels, weights)
    return ce[:n], correct[:n], dx[:n], d_emb, d_bias
