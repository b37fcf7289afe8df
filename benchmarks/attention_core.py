"""The attention core at the 150m's shape [8, 512, 12, 64] (global, forward), in several XLA formulations.

    JAX_PLATFORMS=cpu python benchmarks/attention_core.py

einsum: einsums over [B, T, H, D] + where + jax.nn.softmax (ettin_jax's core before commit 1150b86); reference:
`attention.reference_attention` (heads-major, softmax normalised after the PV product; the CPU path from 1150b86 to
a98da94, now the ground truth and the KV-cache path); tiled: `xla_attention.tiled_attention`, the CPU path of every layer
since a98da94 (cache-sized tiles); bias: heads-major with an additive mask; dpa_*: jax.nn.dot_product_attention
(XLA). Forward only; the tiled core's backward is where it gains most (docs/perf.md). Figures: benchmarks/RESULTS.md, "Where our time goes".
"""
import math
import time

import jax
import jax.numpy as jnp

from ettin_jax import attention
from ettin_jax.kernels import xla_attention
B, T, H, D = 8, 512, 12, 64
kq, kk, kv = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(x, (B, T, H, D)) for x in (kq, kk, kv))
seg = jnp.ones((B, T), jnp.int32)
scale = 1 / math.sqrt(D)
def einsum(q, k, v, seg):
    ok = seg[:, :, None] == seg[:, None, :]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(ok[:, None], s, -1e30)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)
def shipped(q, k, v, seg):
    return attention.reference_attention(q, k, v, q_seg=seg, k_seg=seg, band=(None, None))
def tiled(q, k, v, seg):
    return xla_attention.tiled_attention(q, k, v, q_seg=seg, k_seg=seg, band=(None, None))
def bias(q, k, v, seg):
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    b = jnp.where(seg[:, :, None] == seg[:, None, :], 0.0, -1e30)[:, None]
    s = jnp.matmul(qt * scale, jnp.swapaxes(kt, -1, -2)) + b
    e = jnp.exp(s - jnp.max(s, -1, keepdims=True))
    o = jnp.matmul(e, vt) / jnp.sum(e, -1, keepdims=True)
    return jnp.swapaxes(o, 1, 2)
def nomask(q, k, v, seg):
    return jax.nn.dot_product_attention(q, k, v)
def dpa_mask(q, k, v, seg):
    return jax.nn.dot_product_attention(q, k, v, mask=(seg[:, :, None] == seg[:, None, :])[:, None])
ref = jax.jit(einsum)(q, k, v, seg)
for name, f in [("einsum", einsum), ("reference", shipped), ("tiled", tiled), ("bias", bias), ("dpa_nomask", nomask), ("dpa_mask", dpa_mask)]:
    g = jax.jit(f)
    out = g(q, k, v, seg).block_until_ready()
    best = 1e9
    for _ in range(5):
        t = time.perf_counter(); g(q, k, v, seg).block_until_ready(); best = min(best, time.perf_counter() - t)
    fl = 4 * B * H * T * T * D
    print(f"{name:12s} {best*1e3:7.1f} ms  {fl/best/1e9:6.1f} GFLOP/s  maxdiff {float(jnp.abs(out-ref).max()):.1e}")
