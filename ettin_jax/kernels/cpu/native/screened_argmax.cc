// The exact argmax of the tied decoder's logits, h . e_i + bias_i, reading a bf16 copy of the embedding: an XLA FFI
// handler for greedy decoding on CPU (ettin_jax/screened_argmax.py builds it and says why).
//
// Pass 1 (over the rows, split between the calling thread and XLA's intra-op pool): a_i = bf16(h) . lo_i + bias_i,
// where lo_i = bf16(e_i). The bf16 products are exact in fp32, so |h . e_i + bias_i - a_i| <= bound_i, with
//   bound_i = ||h - bf16(h)|| ||e_i|| + ||bf16(h)|| ||e_i - lo_i|| + (fp32 summation error) + (bias add rounding).
// With AVX512-BF16 the products run as VDPBF16PS (exact bf16 products, fp32 sums rounded to nearest; denormals
// flushed, which the bound's absolute floor of 1e-30 covers).
// Pass 2: only rows with a_i + bound_i >= max_j (a_j - bound_j) can hold the maximum; they are recomputed from the
// fp32 rows (in double) and the best is returned (the first of equals, as argmax). Nothing is approximated: the
// screen only decides which rows need their exact value.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowsPerChunk = 1024;

inline float Bf16ToFloat(uint16_t x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t FloatToBf16(float f) {  // round to nearest even (finite inputs)
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// A pass over the rows in chunks of kRowsPerChunk, run by the calling thread and XLA's intra-op pool together.
struct ChunkedPass {
  int64_t rows = 0, width = 0;
  virtual ~ChunkedPass() = default;
  virtual void Rows(int64_t r0, int64_t r1) = 0;
};

void RunOnPool(ffi::ThreadPool& pool, ChunkedPass& pass, int64_t rows, int64_t width) {
  pass.rows = rows, pass.width = width;
  ettin::ParallelFor(pool, (rows + kRowsPerChunk - 1) / kRowsPerChunk, [&pass, rows](int64_t c, int) {
    pass.Rows(c * kRowsPerChunk, std::min(rows, (c + 1) * kRowsPerChunk));
  });
}

// Pass 1 of the screened argmax: a_r and bound_r for every row.
struct ScorePass : ChunkedPass {
  std::vector<uint16_t> hb;  // bf16(h)
  std::vector<float> a, bound;
  const uint16_t* lo;
  const float *bias, *norm, *err;
  float c_norm, c_err;

  // bf16(h) . lo_r in fp32: AVX512-BF16's dot-product instruction where the CPU has it (bandwidth-bound: ~27 GB/s
  // on 2 cores), else a loop the compiler vectorises (compute-bound at about a third of that).
  float Dot(const uint16_t* row) const {
    int64_t k = 0;
    float acc = 0.f;
#if defined(__AVX512BF16__)
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (; k + 64 <= width; k += 64) {
      acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(row + k), (__m512bh)_mm512_loadu_si512(&hb[k]));
      acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(row + k + 32),
                              (__m512bh)_mm512_loadu_si512(&hb[k + 32]));
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#endif
#pragma omp simd reduction(+ : acc)
    for (int64_t j = k; j < width; ++j) acc += Bf16ToFloat(hb[j]) * Bf16ToFloat(row[j]);
    return acc;
  }

  void Rows(int64_t r0, int64_t r1) override {
    for (int64_t r = r0; r < r1; ++r) {
      a[r] = Dot(lo + r * width) + bias[r];
      bound[r] = c_norm * norm[r] + c_err * err[r];
    }
  }
};

ffi::Error ScreenedArgmaxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::BF16> lo,
                              ffi::Buffer<ffi::F32> emb, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> norm,
                              ffi::Buffer<ffi::F32> err, ffi::ResultBuffer<ffi::S32> token,
                              ffi::ResultBuffer<ffi::S32> candidates) {
  const int64_t rows = emb.dimensions()[0], width = emb.dimensions()[1];
  if (h.element_count() != width || lo.dimensions()[0] != rows || lo.dimensions()[1] != width ||
      bias.element_count() != rows || norm.element_count() != rows || err.element_count() != rows) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "screened_argmax: shapes do not match");
  }
  const float* hf = h.typed_data();
  auto pass = std::make_unique<ScorePass>();
  pass->hb.resize(width), pass->a.resize(rows), pass->bound.resize(rows);
  pass->lo = lo.typed_data(), pass->bias = bias.typed_data(), pass->norm = norm.typed_data();
  pass->err = err.typed_data();
  double h2 = 0, hb2 = 0, dh2 = 0;
  for (int64_t k = 0; k < width; ++k) {
    const float x = hf[k];
    pass->hb[k] = FloatToBf16(x);
    const float xb = Bf16ToFloat(pass->hb[k]);
    h2 += double(x) * x, hb2 += double(xb) * xb, dh2 += double(x - xb) * (x - xb);
  }
  if (!std::isfinite(h2)) {  // NaN or inf features: the caller computes the logits instead
    *token->typed_data() = -1;
    *candidates->typed_data() = -1;
    return ffi::Error::Success();
  }
  // Summation of `width` fp32 terms in any order: error <= gamma * sum |terms| <= gamma * ||hb|| ||lo_i||, and
  // ||lo_i|| <= ||e_i|| (1 + 2^-8); the bias add and a_i -+ bound_i round once more each (relative 2^-24 of |a_i|,
  // covered by the 1e-6 relative slack below). The bound is inflated by 1% and floored at 1e-30.
  const double gamma = width * std::ldexp(1.0, -24) / (1 - width * std::ldexp(1.0, -24));
  pass->c_norm = float((std::sqrt(dh2) + gamma * std::sqrt(hb2) * (1 + std::ldexp(1.0, -8))) * 1.01);
  pass->c_err = float(std::sqrt(hb2) * 1.01);

  RunOnPool(pool, *pass, rows, width);
  const std::vector<float>& a = pass->a;
  const std::vector<float>& bound = pass->bound;

  float threshold = -INFINITY;
  bool bad = false;
  for (int64_t r = 0; r < rows; ++r) {
    threshold = std::max(threshold, a[r] - bound[r] - 1e-6f * std::fabs(a[r]));
    bad |= !std::isfinite(a[r]);
  }
  if (bad || !std::isfinite(threshold)) {  // a NaN or inf in the embedding or bias: the plain product decides
    *token->typed_data() = -1;
    *candidates->typed_data() = -1;
    return ffi::Error::Success();
  }
  const float* e = emb.typed_data();
  const float* b = bias.typed_data();
  int64_t best = -1, count = 0;
  double best_value = -INFINITY;
  for (int64_t r = 0; r < rows; ++r) {
    if (a[r] + bound[r] + 1e-6f * std::fabs(a[r]) + 1e-30f < threshold) continue;
    ++count;
    const float* row = e + r * width;
    double acc = 0;
    for (int64_t k = 0; k < width; ++k) acc += double(hf[k]) * row[k];
    const double value = double(float(acc) + b[r]);  // the logit as fp32 holds it
    if (best < 0 || value > best_value) best = r, best_value = value;
  }
  *token->typed_data() = static_cast<int32_t>(best);
  *candidates->typed_data() = static_cast<int32_t>(count);
  return ffi::Error::Success();
}

// The screen's inputs from the fp32 embedding in one pass: lo = bf16(e) (round to nearest even), ||e_i|| and
// ||e_i - lo_i|| (XLA:CPU's row reductions over the [V, H] embedding took ~130 ms; this is one read at bandwidth).
struct PreparePass : ChunkedPass {
  const float* emb;
  uint16_t* lo;
  float *norm, *err;

  void Rows(int64_t r0, int64_t r1) override {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = emb + r * width;
      uint16_t* b = lo + r * width;
      double n2 = 0, e2 = 0;
#pragma omp simd
      for (int64_t k = 0; k < width; ++k) b[k] = FloatToBf16(x[k]);
#pragma omp simd reduction(+ : n2, e2)
      for (int64_t k = 0; k < width; ++k) {
        const double d = double(x[k]) - double(Bf16ToFloat(b[k]));
        n2 += double(x[k]) * x[k], e2 += d * d;
      }
      norm[r] = float(std::sqrt(n2) * (1 + 1e-6)), err[r] = float(std::sqrt(e2) * (1 + 1e-6));  // rounded up
    }
  }
};

ffi::Error ScreenPrepareImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> emb, ffi::ResultBuffer<ffi::BF16> lo,
                             ffi::ResultBuffer<ffi::F32> norm, ffi::ResultBuffer<ffi::F32> err) {
  auto pass = std::make_unique<PreparePass>();
  pass->emb = emb.typed_data(), pass->lo = lo->typed_data(), pass->norm = norm->typed_data();
  pass->err = err->typed_data();
  RunOnPool(pool, *pass, emb.dimensions()[0], emb.dimensions()[1]);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScreenedArgmax, ScreenedArgmaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h [width]: the head's features
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // lo [rows, width]: bf16(embedding)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // emb [rows, width]: the fp32 embedding
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias [rows]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // norm [rows]: ||e_i||
                                  .Arg<ffi::Buffer<ffi::F32>>()   // err [rows]: ||e_i - lo_i||
                                  .Ret<ffi::Buffer<ffi::S32>>()   // token []
                                  .Ret<ffi::Buffer<ffi::S32>>());  // candidates []: rows recomputed

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScreenPrepare, ScreenPrepareImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // emb [rows, width]
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // lo [rows, width]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // norm [rows]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // err [rows]
