"""fp32 GEMM throughput of XLA (jitted jnp.dot), torch (torch.matmul, 2 threads) and numpy's OpenBLAS (np.matmul
into a preallocated output) at the model's shapes.

    python benchmarks/gemm.py torch; python benchmarks/gemm.py numpy
    JAX_PLATFORMS=cpu python benchmarks/gemm.py xla   # XLA_FLAGS=... to try dot backends

Figures: benchmarks/RESULTS.md, "Where our time goes".
"""
import os
import sys
import time

shapes = [(16384, 768, 2304), (16384, 1152, 768), (8192, 256, 768), (8192, 384, 256), (2048, 2048, 2048),
          (512, 256, 50368)]


def bench(f, reps=5):
    """Best of `reps` timed calls of f() after one warm-up call, in seconds."""
    f(); best = 1e9
    for _ in range(reps):
        t = time.perf_counter(); f(); best = min(best, time.perf_counter() - t)
    return best


def main(which):
    if which == "torch":
        import torch; torch.set_num_threads(2)
        for m, k, n in shapes:
            a, b = torch.randn(m, k), torch.randn(k, n)
            t = bench(lambda: a @ b)
            print(f"torch {m}x{k}x{n}: {2*m*k*n/t/1e9:6.1f} GFLOP/s")
    elif which == "numpy":
        import numpy as np
        for m, k, n in shapes:
            a, b = np.random.randn(m, k).astype(np.float32), np.random.randn(k, n).astype(np.float32)
            out = np.empty((m, n), np.float32)
            t = bench(lambda: np.matmul(a, b, out=out))
            print(f"numpy {m}x{k}x{n}: {2*m*k*n/t/1e9:6.1f} GFLOP/s")
    else:
        import jax, jax.numpy as jnp
        for m, k, n in shapes:
            a, b = jnp.ones((m, k)), jnp.ones((k, n))
            f = jax.jit(lambda x, y: x @ y)
            t = bench(lambda: f(a, b).block_until_ready())
            print(f"xla[{os.environ.get('XLA_FLAGS','')}] {m}x{k}x{n}: {2*m*k*n/t/1e9:6.1f} GFLOP/s")


if __name__ == "__main__":
    main(sys.argv[1])
