// Scale-only LayerNorm's forward pass for fp32 on CPU: an XLA FFI handler used by `model.layer_norm` on one device
// of an AVX-512 CPU (ettin_jax/cpu_norm.py says when).
//
// x [R, H] -> y = (x - mean) * rstd * scale, with the per-row mean and rstd = 1 / sqrt(var + eps) ([R, 1] each, the
// backward pass's residuals): model._layer_norm's function, in one pass over memory (each row is read once into L1,
// its statistics summed there, and y written once), where XLA:CPU's version reads x three times and writes and
// reads the centred squares once more. Rows are tasks in blocks of 64 on the calling thread and XLA's intra-op pool.
// Requirements (checked): H a positive multiple of 16.
#if !defined(__AVX512F__)
#error "layer_norm.cc needs AVX-512 (ettin_jax/cpu_norm.py checks the CPU before building it)"
#endif
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace {

namespace ffi = xla::ffi;

constexpr int64_t kRowsPerTask = 64;

void Row(const float* x, const float* scale, int64_t h, float eps, float* y, float* mean, float* rstd) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= h; j += 32) {
    s0 = _mm512_add_ps(s0, _mm512_loadu_ps(x + j));
    s1 = _mm512_add_ps(s1, _mm512_loadu_ps(x + j + 16));
  }
  if (j < h) s0 = _mm512_add_ps(s0, _mm512_loadu_ps(x + j));
  const float m = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) / float(h);
  const __m512 mv = _mm512_set1_ps(m);
  __m512 q0 = _mm512_setzero_ps(), q1 = _mm512_setzero_ps();
  for (j = 0; j + 32 <= h; j += 32) {
    const __m512 d0 = _mm512_sub_ps(_mm512_loadu_ps(x + j), mv), d1 = _mm512_sub_ps(_mm512_loadu_ps(x + j + 16), mv);
    q0 = _mm512_fmadd_ps(d0, d0, q0);
    q1 = _mm512_fmadd_ps(d1, d1, q1);
  }
  if (j < h) {
    const __m512 d0 = _mm512_sub_ps(_mm512_loadu_ps(x + j), mv);
    q0 = _mm512_fmadd_ps(d0, d0, q0);
  }
  const float r = 1.0f / std::sqrt(_mm512_reduce_add_ps(_mm512_add_ps(q0, q1)) / float(h) + eps);
  const __m512 rv = _mm512_set1_ps(r);
  for (j = 0; j < h; j += 16)
    _mm512_storeu_ps(y + j, _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + j), mv), rv),
                                          _mm512_loadu_ps(scale + j)));
  *mean = m, *rstd = r;
}

ffi::Error LayerNormImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, float eps,
                         ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                         ffi::ResultBuffer<ffi::F32> rstd) {
  const auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("layer_norm: x must be [rows, H]");
  const int64_t rows = dims[0], h = dims[1];
  if (h <= 0 || h % 16 != 0) return ffi::Error::InvalidArgument("layer_norm: H must be a positive multiple of 16");
  if (scale.element_count() != size_t(h)) return ffi::Error::InvalidArgument("layer_norm: scale must be [H]");
  if (y->element_count() != size_t(rows * h) || mean->element_count() != size_t(rows) ||
      rstd->element_count() != size_t(rows))
    return ffi::Error::InvalidArgument("layer_norm: the results' shapes are wrong");
  const float *xp = x.typed_data(), *sp = scale.typed_data();
  float *yp = y->typed_data(), *mp = mean->typed_data(), *rp = rstd->typed_data();
  ettin::ParallelFor(pool, (rows + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task, int) {
    const int64_t r1 = std::min(rows, (task + 1) * kRowsPerTask);
    for (int64_t r = task * kRowsPerTask; r < r1; ++r) Row(xp + r * h, sp, h, eps, yp + r * h, mp + r, rp + r);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LayerNorm, LayerNormImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [R, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale [H]
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y [R, H]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // mean [R, 1]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // rstd [R, 1]
