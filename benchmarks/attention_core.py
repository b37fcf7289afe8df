"""The attention core at the 150m's shape [8, 512, 12, 64] (global, forward), in several XLA formulations.

    JAX_PLATFORMS=cpu python benchmarks/attention_core.py

current: ettin_jax.attention's einsum + where + softmax; bhtd: [B, H, T, D] layout, hand-written softmax; bias:
additive mask; dpa_*: jax.nn.dot_product_attention (XLA). Figures: benchmarks/RESULTS.md, "Where our time goes".
"""
import time, math, jax, jax.numpy as jnp
B, T, H, D = 8, 512, 12, 64
kq, kk, kv = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(x, (B, T, H, D)) for x in (kq, kk, kv))
seg = jnp.ones((B, T), jnp.int32)
scale = 1 / math.sqrt(D)
def cur(q, k, v, seg):
    ok = seg[:, :, None] == seg[:, None, :]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(ok[:, None], s, -1e30)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)
def bhtd(q, k, v, seg):
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, H, T, D]
    ok = seg[:, :, None] == seg[:, None, :]
    s = jnp.matmul(qt * scale, jnp.swapaxes(kt, -1, -2))
    s = jnp.where(ok[:, None], s, -1e30)
    m = jnp.max(s, -1, keepdims=True)
    e = jnp.exp(s - m)
    o = jnp.matmul(e, vt) / jnp.sum(e, -1, keepdims=True)
    return jnp.swapaxes(o, 1, 2)
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
ref = jax.jit(cur)(q, k, v, seg)
for name, f in [("current", cur), ("bhtd", bhtd), ("bias", bias), ("dpa_nomask", nomask), ("dpa_mask", dpa_mask)]:
    g = jax.jit(f)
    out = g(q, k, v, seg).block_until_ready()
    best = 1e9
    for _ in range(5):
        t = time.perf_counter(); g(q, k, v, seg).block_until_ready(); best = min(best, time.perf_counter() - t)
    fl = 4 * B * H * T * T * D
    print(f"{name:12s} {best*1e3:7.1f} ms  {fl/best/1e9:6.1f} GFLOP/s  maxdiff {float(jnp.abs(out-ref).max()):.1e}")
