"""XLA's fused decoder cross-entropy (objectives.decoder_cross_entropy, value and gradients) against the same
computation in one native kernel (benchmarks/native/fused_ce.cc, an XLA FFI handler with AVX-512 GEMM tiles and
the softmax done on cache-resident vocabulary chunks).

    python benchmarks/fused_ce.py [--rows=8192] [--rounds=5]   # needs g++ and AVX-512 (compiles into a temp dir)

8192 rows are the CLM 8 x 1024 step's, 2458 the MLM step's masked positions. Checks the two agree (loss, dx, dE,
db), then times them alternating in one process. docs/perf.md, "A native fused cross-entropy": 12-15% faster than
XLA's on the 2-core machine; not yet used by the model. A measurement, not part of the model.
"""
import argparse
import ctypes
import os
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp

from ettin_jax import objectives

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native", "fused_ce.cc")


def build(folder):
    path = os.path.join(folder, "fused_ce.so")
    subprocess.run(["g++", "-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", f"-I{jax.ffi.include_dir()}",
                    SOURCE, "-o", path], check=True, capture_output=True, text=True)
    lib = ctypes.cdll.LoadLibrary(path)
    jax.ffi.register_ffi_target("bench_fused_ce", jax.ffi.pycapsule(lib.FusedCe), platform="cpu")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=50368)
    ap.add_argument("--width", type=int, default=256)
    a = ap.parse_args()
    n, v, h = -(-a.rows // 32) * 32, a.vocab, a.width
    with tempfile.TemporaryDirectory() as folder:
        build(folder)
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k[0], (n, h)) * 0.5
    emb = jax.random.normal(k[1], (v, h)) * 0.05
    bias = jax.random.normal(k[2], (v,)) * 0.01
    y = jax.random.randint(k[3], (n,), 0, v)
    w = jnp.ones((n,))

    def native(x, emb, bias):
        f32 = jnp.float32
        out = (jax.ShapeDtypeStruct((n,), f32), jax.ShapeDtypeStruct((n,), f32), jax.ShapeDtypeStruct((n, h), f32),
               jax.ShapeDtypeStruct((v, h), f32), jax.ShapeDtypeStruct((v,), f32))
        ce, _, dx, d_emb, d_bias = jax.ffi.ffi_call("bench_fused_ce", out)(x, emb, bias, y, w)
        return jnp.sum(w * ce), (dx, d_emb, d_bias)

    def xla(x, emb, bias):
        loss = lambda x, emb, bias: objectives.decoder_cross_entropy(x, emb, bias, y, w, chunk=512)[0]
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, emb, bias)

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
