"""XLA:CPU's fp32 GEMMs against the same GEMMs through an XLA FFI custom call to scipy's OpenBLAS `sgemm`.

    python benchmarks/blas_ffi.py      # needs g++ (compiles a 30-line handler into a temporary folder)

The lever docs/perf.md weighs for the CPU GEMM gap ("A faster BLAS for XLA's dots"): the handler runs `sgemm` on
XLA's own buffers (no copies, unlike `jax.pure_callback`), taking the function pointer from
`scipy.linalg.cython_blas` the way jaxlib reaches LAPACK. A measurement, not part of the model.
"""
import ctypes
import os
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg.cython_blas as cython_blas

from gemm import bench  # best-of-5 timing, as benchmarks/gemm.py measures its GEMMs

HANDLER = r"""
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;
typedef void (*sgemm_t)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                        const int*, const float*, const int*, const float*, float*, const int*);
static sgemm_t g_sgemm = nullptr;
extern "C" void set_sgemm(void* p) { g_sgemm = reinterpret_cast<sgemm_t>(p); }

static ffi::Error GemmImpl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c,
                           bool trans_b) {
  if (!g_sgemm) return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "sgemm not set");
  auto ad = a.dimensions(); auto bd = b.dimensions();
  int M = ad[0], K = ad[1];
  int N = trans_b ? bd[0] : bd[1];
  const char ta = trans_b ? 'T' : 'N', tb = 'N';
  const float alpha = 1.f, beta = 0.f;
  int ld_first = trans_b ? K : N, ld_second = K, ldc = N;
  g_sgemm(&ta, &tb, &N, &M, &K, &alpha, b.typed_data(), &ld_first, a.typed_data(), &ld_second, &beta,
          c->typed_data(), &ldc);
  return ffi::Error::Success();
}
XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemm, GemmImpl,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
        .Attr<bool>("trans_b"));
"""


def _load():
    folder = tempfile.mkdtemp(prefix="ettin_blas_ffi_")
    with open(os.path.join(folder, "gemm.cc"), "w") as f:
        f.write(HANDLER)
    lib_path = os.path.join(folder, "libgemm.so")
    subprocess.run(["g++", "-O2", "-shared", "-fPIC", "-std=c++17", "-w", f"-I{jax.ffi.include_dir()}",
                    os.path.join(folder, "gemm.cc"), "-o", lib_path], check=True)
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype, api.PyCapsule_GetName.argtypes = ctypes.c_char_p, [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    capsule = cython_blas.__pyx_capi__["sgemm"]
    lib = ctypes.cdll.LoadLibrary(lib_path)
    lib.set_sgemm.argtypes = [ctypes.c_void_p]
    lib.set_sgemm(api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule)))
    jax.ffi.register_ffi_target("ettin_sgemm", jax.ffi.pycapsule(lib.Gemm), platform="cpu")


def gemm(a, b, trans_b=False):
    n = b.shape[0] if trans_b else b.shape[1]
    return jax.ffi.ffi_call("ettin_sgemm", jax.ShapeDtypeStruct((a.shape[0], n), jnp.float32))(a, b, trans_b=trans_b)


def main():
    _load()
    for m, k, n, tb in [(16384, 768, 2304, False), (16384, 1152, 768, False), (8192, 256, 768, False),
                        (512, 256, 50368, True), (512, 256, 50368, False)]:
        ka = jax.random.split(jax.random.key(0))
        a = jax.random.normal(ka[0], (m, k))
        b = jax.random.normal(ka[1], (n, k) if tb else (k, n))
        f = jax.jit(lambda a, b: gemm(a, b, tb))
        g = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1 if tb else 0,)), ((), ()))))
        np.testing.assert_allclose(f(a, b), g(a, b), rtol=1e-4, atol=1e-3)
        flop = 2 * m * k * n
        ffi_s = bench(lambda: jax.block_until_ready(f(a, b)))
        xla_s = bench(lambda: jax.block_until_ready(g(a, b)))
        print(f"{m}x{k}x{n} trans_b={tb}: ffi {flop / ffi_s / 1e9:.0f}  xla {flop / xla_s / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
