"""The decoder cross-entropy's two paths, value and gradients: XLA's chunked one (cross_entropy._decoder_ce_chunks)
against the native kernel (ettin_jax/fused_ce.py, native/fused_ce.cc: AVX-512 GEMM tiles with the softmax done
on cache-resident vocabulary chunks), which fp32 training on an AVX-512 CPU uses.

    python benchmarks/fused_ce.py [--rows=8192] [--rounds=5]   # needs g++ and AVX-512

8192 rows are the CLM 8 x 1024 step's, 2458 the MLM step's masked positions. Checks the two agree (loss, dx, dE,
db), then times them alternating in one process. docs/perf.md item 15: 18-30% faster than XLA's on the 2-core
machine.
"""
import argparse
import time

import jax
import jax.numpy as jnp

from ettin_jax import objectives
from ettin_jax.kernels import cross_entropy
from ettin_jax.kernels.cpu import fused_ce


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=50368)
    ap.add_argument("--width", type=int, default=256)
    a = ap.parse_args()
    n, v, h = a.rows, a.vocab, a.width
    if not fused_ce.available():
        raise SystemExit("the native fused CE is not available here (needs AVX-512 and g++; see the logged warning)")
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k[0], (n, h)) * 0.5
    emb = jax.random.normal(k[1], (v, h)) * 0.05
    bias = jax.random.normal(k[2], (v,)) * 0.01
    y = jax.random.randint(k[3], (n,), 0, v)
    w = jnp.ones((n,))

    def native(x, emb, bias):
        ce, _, dx, d_emb, d_bias = fused_ce.cross_entropy(x, emb, bias, y, w)
        return jnp.sum(w * ce), (dx, d_emb, d_bias)

    def xla(x, emb, bias):
        (loss, _, d_emb, d_bias), dx, _ = cross_entropy._decoder_ce_chunks(x, emb, bias, y, w, 512, True)
        return loss, (dx, d_emb, d_bias)

    fn, fx = jax.jit(native), jax.jit(xla)
    (l1, g1), (l2, g2) = fn(x, emb, bias), fx(x, emb, bias)
    diff = [float(jnp.max(jnp.abs(p - q))) for p, q in zip(g1, g2)]
    print(f"loss native {float(l1):.6g} xla {float(l2):.6g}; max |diff| dx {diff[0]:.2e} dE {diff[1]:.2e} "
          f"db {diff[2]:.2e}")
    times = {"native": [], "xla": []}
    for r in range(a.rounds):
        for name, f in (("native", fn), ("xla", fx))[::1 if r % 2 == 0 else -1]:
            t = time.perf_counter()
            jax.block_until_ready(f(x, emb, bias))
            times[name].append(time.perf_counter() - t)
    flops = 6 * n * v * h
    for name, ts in times.items():
        ts = sorted(ts)
        print(f"{name:6s} median {ts[len(ts) // 2]:.3f} s (min {ts[0]:.3f}), {flops / ts[len(ts) // 2] / 1e9:.0f} "
              f"GFLOP/s")


if __name__ == "__main__":
    main()
