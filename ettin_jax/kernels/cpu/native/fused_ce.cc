// The tied decoder's cross-entropy and its gradients in one pass on CPU (fp32): an XLA FFI handler used by
// objectives.decoder_cross_entropy's forward-with-gradients pass (ettin_jax/fused_ce.py says when). 18-30% faster
// than the same computation in XLA on the 2-core machine (benchmarks/fused_ce.py; docs/perf.md item 15).
//
// For features x [n, h], embedding E [v, h], bias b [v], labels y [n] and weights w [n] it returns per row
// ce_r = lse_r - l_{r, y_r} and correct_r = [l_{r, y_r} >= max_j l_rj] (l = x E^T + b), and the gradients of
// sum_r w_r ce_r: dx = D E, dE = D^T x, db = column sums of D, with D = w (softmax(l) - onehot(y)).
//
// XLA runs the same computation (objectives._decoder_ce_chunks) as three GEMMs per chunk of rows with ~8 passes
// over the [rows, 50368] logits between them (bias, max, exp, sum, scale, the label scatter, the bias gradient,
// the carry add), each at memory speed. Here the rows go in blocks of kRowBlock; each block's logits are
// computed a vocabulary chunk at a time by a register-blocked AVX-512 kernel, and every elementwise step is done
// on the chunk while it is in L2: the logits make one trip to memory (written as exp(l - chunk max), read back
// once for the gradient products). The chunks of a block run on the calling thread and XLA's intra-op pool.
//
// Layouts, chosen so that no operand needs packing but x^T (one block's, 512 KB): the logits are kept
// transposed, S[v][r], so the softmax's reductions over the vocabulary are vector operations across rows.
//   logits:  S[v][r] = sum_k E[v][k] xT[k][r]   (E broadcast, xT loaded as vectors)
//   dE:      dE[v][:] += sum_r D[v][r] x[r][:]   (D broadcast, x rows loaded)
//   dx:      dx[r][:] += sum_v D[v][r] E[v][:]   (D broadcast, E rows loaded)
// Requirements (checked by the handler): n a multiple of 32 (a caller pads with weight-0 rows), h a
// multiple of 64. A label outside [0, v) reads the logit of the nearest valid one and adds no one-hot term.

#if !defined(__AVX512F__)
#error "fused_ce.cc needs AVX-512 (ettin_jax/fused_ce.py checks the CPU before building it)"
#endif
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "pool.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ettin_ce {

using ettin::Alloc;
using ettin::Floats;

// Rows per block: a multiple of 32. Every block streams all of E twice (logits, dx) and reads and writes all of dE
// once: 512 rows make that traffic a quarter of 128 rows' (the CE kernel alone 1.38 -> 1.17 s at the MLM step's
// 2464 rows), for logits scratch of 512 x v floats (103 MB at the 50k vocabulary).
constexpr int64_t kRowBlock = 512;
constexpr int64_t kVChunk = 288;     // vocabulary rows per task: a multiple of 12, of 6 and of 32 (its logits:
                                     // 576 KB at 512 rows, in L2 from the logits through the exp and gradients)
constexpr int kPanel = 32;           // rows per packed x^T panel (two vectors)
constexpr int64_t kGroups = 8;       // pass 2's tasks: runs of chunks, each with its own dx partial sum

struct Problem {
  int64_t n, h, v;
  const float *x, *emb, *bias, *w;
  const int32_t* y;
  float *ce, *correct, *dx, *demb, *dbias;
};

using ettin::Exp;

// S[v + i][p*32 .. p*32 + 32) = E[v + i] . xT panel p + b[v + i], i < MR; running max in mx.
template <int MR>
inline void LogitsTile(const Problem& pb, int64_t v, const float* xt, int64_t rows, float* s, float* mx,
                       int64_t p) {
  const int64_t h = pb.h;
  const float* e = pb.emb + v * h;
  const float* b = xt + p * h * kPanel;
  __m512 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < h; ++k) {
    const __m512 b0 = _mm512_loadu_ps(b + k * kPanel), b1 = _mm512_loadu_ps(b + k * kPanel + 16);
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(e[i * h + k]);
      acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
    }
  }
  __m512 m0 = _mm512_loadu_ps(mx + p * kPanel), m1 = _mm512_loadu_ps(mx + p * kPanel + 16);
  for (int i = 0; i < MR; ++i) {
    const __m512 bias = _mm512_set1_ps(pb.bias[v + i]);
    acc[i][0] = _mm512_add_ps(acc[i][0], bias);
    acc[i][1] = _mm512_add_ps(acc[i][1], bias);
    _mm512_storeu_ps(s + i * rows + p * kPanel, acc[i][0]);
    _mm512_storeu_ps(s + i * rows + p * kPanel + 16, acc[i][1]);
    m0 = _mm512_max_ps(m0, acc[i][0]);
    m1 = _mm512_max_ps(m1, acc[i][1]);
  }
  _mm512_storeu_ps(mx + p * kPanel, m0);
  _mm512_storeu_ps(mx + p * kPanel + 16, m1);
}

// dE[v + i][j .. j + 64) += sum_r D[v + i][r] x[r][j .. j + 64), i < MR (D = s, rows r of this block).
template <int MR>
inline void EmbGradTile(const Problem& pb, int64_t v, int64_t j, const float* d, const float* x, int64_t rows) {
  const int64_t h = pb.h;
  __m512 acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int q = 0; q < 4; ++q) acc[i][q] = _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * h + j;
    const __m512 b0 = _mm512_loadu_ps(xr), b1 = _mm512_loadu_ps(xr + 16), b2 = _mm512_loadu_ps(xr + 32),
                 b3 = _mm512_loadu_ps(xr + 48);
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(d[i * rows + r]);
      acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(a, b2, acc[i][2]);
      acc[i][3] = _mm512_fmadd_ps(a, b3, acc[i][3]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* out = pb.demb + (v + i) * h + j;
    for (int q = 0; q < 4; ++q) _mm512_storeu_ps(out + 16 * q, _mm512_add_ps(_mm512_loadu_ps(out + 16 * q), acc[i][q]));
  }
}

// dxp[r + i][j .. j + 32) += sum_{u < vn} D[u][r + i] E[v0 + u][j .. j + 32), i < MR.
template <int MR>
inline void FeatGradTile(const Problem& pb, int64_t v0, int64_t vn, int64_t j, const float* d, int64_t rows,
                         int64_t r, float* dxp) {
  const int64_t h = pb.h;
  __m512 acc[MR][2];
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = _mm512_loadu_ps(dxp + (r + i) * h + j);
    acc[i][1] = _mm512_loadu_ps(dxp + (r + i) * h + j + 16);
  }
  for (int64_t u = 0; u < vn; ++u) {
    const float* er = pb.emb + (v0 + u) * h + j;
    const __m512 b0 = _mm512_loadu_ps(er), b1 = _mm512_loadu_ps(er + 16);
    const float* du = d + u * rows + r;
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(du[i]);
      acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm512_storeu_ps(dxp + (r + i) * h + j, acc[i][0]);
    _mm512_storeu_ps(dxp + (r + i) * h + j + 16, acc[i][1]);
  }
}

// Runs the whole problem on the calling thread and XLA's intra-op pool.
inline void Run(const Problem& pb, xla::ffi::ThreadPool& pool) {
  const int64_t n = pb.n, h = pb.h, nv = pb.v;
  const int64_t chunks = (nv + kVChunk - 1) / kVChunk, groups = std::min(kGroups, chunks);
  std::memset(pb.demb, 0, sizeof(float) * nv * h);
  std::memset(pb.dbias, 0, sizeof(float) * nv);
  const int64_t rb_max = std::min(n, kRowBlock);
  Floats s = Alloc(nv * rb_max), xt = Alloc(h * rb_max), cmax = Alloc(chunks * rb_max),
         csum = Alloc(chunks * rb_max), coef = Alloc(chunks * rb_max), dxp = Alloc(groups * rb_max * h);

  for (int64_t r0 = 0; r0 < n; r0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, n - r0);
    const float* x = pb.x + r0 * h;
    for (int64_t p = 0; p < rows / kPanel; ++p)  // x^T in panels of 32 rows: xt[p][k][j] = x[p*32 + j][k]
      for (int64_t j = 0; j < kPanel; ++j)
        for (int64_t k = 0; k < h; ++k) xt[(p * h + k) * kPanel + j] = x[(p * kPanel + j) * h + k];

    // Pass 1, per vocabulary chunk: logits, the chunk's max per row, exp(l - max) in place, its sum per row.
    ettin::ParallelFor(pool, chunks, [&](int64_t c, int) {
      const int64_t v0 = c * kVChunk, v1 = std::min(nv, v0 + kVChunk);
      float* mx = cmax.get() + c * rows;
      float* sm = csum.get() + c * rows;
      for (int64_t r = 0; r < rows; ++r) mx[r] = -INFINITY, sm[r] = 0.f;
      for (int64_t p = 0; p < rows / kPanel; ++p) {  // a panel of x^T (32 KB) stays in L1 across the chunk
        int64_t v = v0;
        for (; v + 12 <= v1; v += 12) LogitsTile<12>(pb, v, xt.get(), rows, s.get() + v * rows, mx, p);
        for (; v < v1; ++v) LogitsTile<1>(pb, v, xt.get(), rows, s.get() + v * rows, mx, p);
      }
      for (int64_t r = 0; r < rows; r += 16) {
        const __m512 m = _mm512_loadu_ps(mx + r);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t u = v0; u < v1; ++u) {
          float* p = s.get() + u * rows + r;
          const __m512 e = Exp(_mm512_sub_ps(_mm512_loadu_ps(p), m));
          _mm512_storeu_ps(p, e);
          acc = _mm512_add_ps(acc, e);
        }
        _mm512_storeu_ps(sm + r, acc);
      }
    });

    // Per row: the log-sum-exp over the chunks, the label's logit (the same fused multiply-adds, in the same
    // order, as the tile that computed it), and each chunk's factor w exp(max_c - max) / sum.
    for (int64_t r = 0; r < rows; ++r) {
      float m = -INFINITY;
      for (int64_t c = 0; c < chunks; ++c) m = std::max(m, cmax[c * rows + r]);
      float total = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {  // coef holds exp(max_c - max) until the row's sum is known
        coef[c * rows + r] = std::exp(cmax[c * rows + r] - m);
        total += csum[c * rows + r] * coef[c * rows + r];
      }
      const int64_t label = std::clamp<int64_t>(pb.y[r0 + r], 0, nv - 1);
      float picked = 0.f;
      for (int64_t k = 0; k < h; ++k) picked = std::fma(pb.emb[label * h + k], x[r * h + k], picked);
      picked += pb.bias[label];
      pb.ce[r0 + r] = m + std::log(total) - picked;
      pb.correct[r0 + r] = picked >= m ? 1.f : 0.f;
      const float wr = pb.w[r0 + r];
      for (int64_t c = 0; c < chunks; ++c) coef[c * rows + r] *= wr / total;
    }

    // Pass 2, per vocabulary chunk: D = coef * e - w onehot(y) in place, then db, dE (rows owned by the chunk)
    // and dx (into its group's partial sum: kGroups fixed runs of chunks, added in a fixed order, so dx is the
    // same whichever threads run them).
    std::memset(dxp.get(), 0, sizeof(float) * groups * rows * h);
    auto chunk = [&](int64_t c, float* part) {
      const int64_t v0 = c * kVChunk, v1 = std::min(nv, v0 + kVChunk);
      const float* cf = coef.get() + c * rows;
      for (int64_t u = v0; u < v1; ++u) {
        float* p = s.get() + u * rows;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t r = 0; r < rows; r += 16) {
          const __m512 d = _mm512_mul_ps(_mm512_loadu_ps(p + r), _mm512_loadu_ps(cf + r));
          _mm512_storeu_ps(p + r, d);
          acc = _mm512_add_ps(acc, d);
        }
        pb.dbias[u] += _mm512_reduce_add_ps(acc);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t label = pb.y[r0 + r];
        if (label >= v0 && label < v1) {
          s[label * rows + r] -= pb.w[r0 + r];
          pb.dbias[label] -= pb.w[r0 + r];
        }
      }
      // dE: a 64-column slice of the block's x (128 KB) stays in L2 across the chunk's rows.
      for (int64_t j = 0; j < h; j += 64) {
        int64_t v = v0;
        for (; v + 6 <= v1; v += 6) EmbGradTile<6>(pb, v, j, s.get() + v * rows, x, rows);
        for (; v < v1; ++v) EmbGradTile<1>(pb, v, j, s.get() + v * rows, x, rows);
      }
      // dx: a 32-column slice of the chunk's E rows (36 KB) stays in L1 across the row tiles, each summing the
      // whole chunk in registers.
      for (int64_t j = 0; j < h; j += 32) {
        const float* d = s.get() + v0 * rows;
        int64_t r = 0;
        for (; r + 12 <= rows; r += 12) FeatGradTile<12>(pb, v0, v1 - v0, j, d, rows, r, part);
        for (; r < rows; r += 4) FeatGradTile<4>(pb, v0, v1 - v0, j, d, rows, r, part);
      }
    };
    ettin::ParallelFor(pool, groups, [&](int64_t g, int) {
      for (int64_t c = g * chunks / groups; c < (g + 1) * chunks / groups; ++c) chunk(c, dxp.get() + g * rows * h);
    });
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < h; ++k) {
        float acc = 0.f;
        for (int64_t g = 0; g < groups; ++g) acc += dxp[(g * rows + r) * h + k];
        pb.dx[(r0 + r) * h + k] = acc;
      }
  }
}

}  // namespace ettin_ce

namespace ffi = xla::ffi;

namespace {

ffi::Error FusedCeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> emb,
                       ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::S32> labels, ffi::Buffer<ffi::F32> weights,
                       ffi::ResultBuffer<ffi::F32> ce, ffi::ResultBuffer<ffi::F32> correct,
                       ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> demb,
                       ffi::ResultBuffer<ffi::F32> dbias) {
  if (x.dimensions().size() != 2 || emb.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("fused_ce: x and emb must be matrices");
  const int64_t n = x.dimensions()[0], h = x.dimensions()[1], v = emb.dimensions()[0];
  if (emb.dimensions()[1] != h || bias.element_count() != size_t(v) || labels.element_count() != size_t(n) ||
      weights.element_count() != size_t(n))
    return ffi::Error::InvalidArgument("fused_ce: inconsistent shapes");
  if (n % 32 != 0 || h % 64 != 0 || n == 0 || v == 0)
    return ffi::Error::InvalidArgument("fused_ce: rows must be a positive multiple of 32, width of 64");
  ettin_ce::Problem pb{n, h, v, x.typed_data(), emb.typed_data(), bias.typed_data(), weights.typed_data(),
                       labels.typed_data(), ce->typed_data(), correct->typed_data(), dx->typed_data(),
                       demb->typed_data(), dbias->typed_data()};
  return ettin::OutOfMemoryAsError("fused_ce", [&] { ettin_ce::Run(pb, pool); });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedCe, FusedCeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [n, h]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // emb [v, h]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias [v]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // labels [n]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // weights [n]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // ce [n]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // correct [n]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx [n, h]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // demb [v, h]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dbias [v]
