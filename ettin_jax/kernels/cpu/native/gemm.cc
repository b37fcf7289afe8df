// fp32 matrix products for the model's projections on CPU: an XLA FFI handler used by `model.Dense` for fp32 on
// one device of an AVX-512 CPU (ettin_jax/cpu_gemm.py says when).
//
// One product, three forms (attribute `form`), so that a projection's forward pass and both gradients run here:
//   0  C[M, N] = A[M, K] B[K, N]        y  = x W
//   1  C[M, K] = A[M, N] B[K, N]^T      dx = g W^T
//   2  C[K, N] = A[M, K]^T B[M, N]      dW = x^T g
// all row-major as XLA hands them over. Each is the same BLIS-style loop over a block of C: the reduction in chunks
// (forms 0 and 1: the whole reduction in one chunk up to kMaxChunk entries, else in equal chunks below it; form 2:
// kChunk); per chunk the block's rows are packed as slivers [chunk][kRows] and each 32-column panel of B as
// [chunk][32] (the forms differ only in the strides these packs read), and a 12 x 32 register tile (24
// accumulators, the B row loaded as two vectors, each A entry broadcast from memory into its FMA) sums the chunk
// into C. Forms 0 and 1: tasks (on the calling thread and XLA's intra-op pool) are blocks of kBlockRows rows, and
// B, the weight, is packed once for all of them; with the reduction in one chunk each C tile is written once, and
// the B panel (up to 144 KB) and the block's packed rows (up to 216 KB) stay in L2. Form 2: the reduction (the
// tokens) is split into kGroups fixed runs, each summed into its own buffer, then added in order. Every C element
// is summed in one fixed order, whatever thread computes it: the result does not depend on scheduling.
// Requirements (checked): N (form 0, 2) or K (form 1), the output's columns, a multiple of 32.
#if !defined(__AVX512F__)
#error "gemm.cc needs AVX-512 (ettin_jax/cpu_gemm.py checks the CPU before building it)"
#endif
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ettin_gemm {

using ettin::Alloc;
using ettin::Floats;

constexpr int64_t kRows = 12;     // rows of the register tile
constexpr int64_t kCols = 32;     // its columns (two 16-lane vectors)
constexpr int64_t kRun = 256;        // reduction entries the registers sum before adding to C (accuracy)
constexpr int64_t kChunk = 256;      // form 2: reduction entries per packed chunk (a B panel of 32 KB)
constexpr int64_t kMaxChunk = 1152;  // forms 0 and 1: the longest chunk (the 150m's widths, 768 and 1152, in one)
constexpr int64_t kGroups = 8;       // fixed runs the weight gradient's reduction is split into
constexpr int64_t kBlockRows = 48;   // forms 0 and 1: C rows per task (4 slivers)

// A view of an operand as a matrix X(r, c) = data[r * rs + c * cs].
struct View {
  const float* data;
  int64_t rs, cs;
  float at(int64_t r, int64_t c) const { return data[r * rs + c * cs]; }
};

// c[kRows x 32] (= or +=) sum_k a[k * kRows + i] * b[k * 32 + j]; only the first `rows` rows are written. The
// registers sum runs of kRun entries, each added to C in turn (a chunk of any length sums as accurately as one of
// kRun: every C element is the in-order sum of its kRun-entry partial sums).
inline void Tile(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int64_t rows, bool acc) {
  for (int64_t i = 0; i < rows; ++i) {  // C's rows are far apart: fetch them while the first run sums
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + 16), _MM_HINT_T0);
  }
  for (int64_t k0 = 0; k0 < kc; k0 += kRun) {
    const int64_t k1 = std::min(kc, k0 + kRun);
    __m512 c0[kRows], c1[kRows];
    for (int i = 0; i < kRows; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int64_t k = k0; k < k1; ++k) {
      const __m512 b0 = _mm512_load_ps(b + k * kCols), b1 = _mm512_load_ps(b + k * kCols + 16);
#pragma GCC unroll 12
      for (int i = 0; i < kRows; ++i) {
        const __m512 x = _mm512_set1_ps(a[k * kRows + i]);
        c0[i] = _mm512_fmadd_ps(x, b0, c0[i]);
        c1[i] = _mm512_fmadd_ps(x, b1, c1[i]);
      }
    }
    for (int64_t i = 0; i < rows; ++i) {
      float* row = c + i * ldc;
      if (acc || k0 > 0) {
        c0[i] = _mm512_add_ps(c0[i], _mm512_loadu_ps(row));
        c1[i] = _mm512_add_ps(c1[i], _mm512_loadu_ps(row + 16));
      }
      _mm512_storeu_ps(row, c0[i]);
      _mm512_storeu_ps(row + 16, c1[i]);
    }
  }
}

// The product C[m, n] = sum_k A(i, k) B(k, j), A [m, kdim] and B [kdim, n] as views, C row-major with ldc.
struct Product {
  View a, b;
  int64_t m, n, kdim;
  float* c;
  int64_t ldc;

  // B's 32-column panel starting at column j, reduction entries [k0, k0 + kc), packed as [kc][32].
  void PackPanel(int64_t j, int64_t k0, int64_t kc, float* dst) const {
    if (b.cs == 1) {
      for (int64_t k = 0; k < kc; ++k) std::memcpy(dst + k * kCols, b.data + (k0 + k) * b.rs + j, kCols * 4);
    } else {
      for (int64_t jj = 0; jj < kCols; ++jj)
        for (int64_t k = 0; k < kc; ++k) dst[k * kCols + jj] = b.at(k0 + k, j + jj);
    }
  }

  // A's rows [r, r + kRows) (those below r1; zeros past it), reduction entries [k0, k0 + kc), as [kc][kRows].
  void PackSliver(int64_t r, int64_t r1, int64_t k0, int64_t kc, float* dst) const {
    const int64_t rows = std::min(kRows, r1 - r);
    if (a.rs == 1) {  // A^T stored: each reduction entry's rows are contiguous
      const __mmask16 in = __mmask16((1u << rows) - 1), out = __mmask16((1u << kRows) - 1);
      for (int64_t k = 0; k < kc; ++k)
        _mm512_mask_storeu_ps(dst + k * kRows, out, _mm512_maskz_loadu_ps(in, a.data + (k0 + k) * a.cs + r));
      return;
    }
    for (int64_t i = 0; i < kRows; ++i) {
      if (i < rows) {
        for (int64_t k = 0; k < kc; ++k) dst[k * kRows + i] = a.at(r + i, k0 + k);
      } else {
        for (int64_t k = 0; k < kc; ++k) dst[k * kRows + i] = 0.f;
      }
    }
  }

  // out rows [r0, r1) x columns [c0, c1) (out: C's layout, row stride ldc) = the sum over reduction entries
  // [k_begin, k_end), in chunks of `chunk`; per chunk the rows are packed once and each panel of B packed once (or
  // taken from `panels`, all of B packed as [n / 32][kdim][32]), then every sliver runs against it.
  void Block(int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t k_begin, int64_t k_end, int64_t chunk,
             float* out, const float* panels, float* apack, float* bpack) const {
    const int64_t slivers = (r1 - r0 + kRows - 1) / kRows;
    for (int64_t k0 = k_begin; k0 < k_end; k0 += chunk) {
      const int64_t kc = std::min(chunk, k_end - k0);
      for (int64_t s = 0; s < slivers; ++s) PackSliver(r0 + s * kRows, r1, k0, kc, apack + s * kc * kRows);
      for (int64_t j = c0; j < c1; j += kCols) {
        const float* panel = bpack;
        if (panels != nullptr) {
          panel = panels + (j / kCols) * kdim * kCols + k0 * kCols;
        } else {
          PackPanel(j, k0, kc, bpack);
        }
        for (int64_t s = 0; s < slivers; ++s) {
          const int64_t r = r0 + s * kRows;
          Tile(kc, apack + s * kc * kRows, panel, out + r * ldc + j, ldc, std::min(kRows, r1 - r), k0 > k_begin);
        }
      }
    }
  }
};

}  // namespace ettin_gemm

namespace {

namespace ffi = xla::ffi;
using ettin_gemm::kBlockRows;
using ettin_gemm::kChunk;
using ettin_gemm::kCols;
using ettin_gemm::kGroups;
using ettin_gemm::kMaxChunk;
using ettin_gemm::kRows;

ffi::Error GemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> lhs, ffi::Buffer<ffi::F32> rhs, int64_t form,
                    ffi::ResultBuffer<ffi::F32> out) {
  const auto ld = lhs.dimensions(), rd = rhs.dimensions(), od = out->dimensions();
  if (ld.size() != 2 || rd.size() != 2 || od.size() != 2)
    return ffi::Error::InvalidArgument("gemm: operands and result must be matrices");
  ettin_gemm::Product p;
  const float *x = lhs.typed_data(), *y = rhs.typed_data();
  if (form == 0) {  // [M, K] [K, N]
    if (rd[0] != ld[1]) return ffi::Error::InvalidArgument("gemm: inner dimensions differ");
    p = {{x, ld[1], 1}, {y, rd[1], 1}, ld[0], rd[1], ld[1]};
  } else if (form == 1) {  // [M, N] [K, N] -> [M, K]
    if (rd[1] != ld[1]) return ffi::Error::InvalidArgument("gemm: inner dimensions differ");
    p = {{x, ld[1], 1}, {y, 1, rd[1]}, ld[0], rd[0], ld[1]};
  } else if (form == 2) {  // [M, K]^T [M, N] -> [K, N]
    if (rd[0] != ld[0]) return ffi::Error::InvalidArgument("gemm: inner dimensions differ");
    p = {{x, 1, ld[1]}, {y, rd[1], 1}, ld[1], rd[1], ld[0]};
  } else {
    return ffi::Error::InvalidArgument("gemm: form must be 0, 1 or 2");
  }
  if (od[0] != p.m || od[1] != p.n) return ffi::Error::InvalidArgument("gemm: the result's shape is wrong");
  if (p.n % kCols != 0) return ffi::Error::InvalidArgument("gemm: the result's columns must be a multiple of 32");
  p.c = out->typed_data(), p.ldc = p.n;
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();
  if (p.kdim == 0) {
    std::fill(p.c, p.c + p.m * p.n, 0.f);
    return ffi::Error::Success();
  }
  return ettin::OutOfMemoryAsError("gemm", [&] {
    if (form == 2) {
      // dW = x^T g: C is small and the reduction (the tokens) long. Tasks: the reduction in kGroups fixed runs
      // (fewer for short ones) x C's columns in blocks of 256; each run's sum goes to its own buffer (run 0's to
      // the result) and the runs are then added in order: the sum does not depend on which thread ran what, and
      // x and g are each read once a column block, row after row.
      const int64_t groups = std::max<int64_t>(1, std::min(kGroups, p.kdim / kChunk));
      const int64_t per = ((p.kdim + groups - 1) / groups + kChunk - 1) / kChunk * kChunk;
      const int64_t col_blocks = (p.n + 255) / 256;
      ettin::Floats partial = groups > 1 ? ettin::Alloc((groups - 1) * p.m * p.n) : nullptr;
      ettin::ParallelFor(pool, groups * col_blocks, [&](int64_t task, int) {
        const int64_t g = task / col_blocks, c0 = (task % col_blocks) * 256, c1 = std::min(p.n, c0 + 256);
        const int64_t k0 = g * per, k1 = std::min(p.kdim, k0 + per);
        float* dst = g == 0 ? p.c : partial.get() + (g - 1) * p.m * p.n;
        if (k0 >= k1) {  // an empty run (the last ones, where the runs round up to whole chunks): zero
          for (int64_t r = 0; r < p.m; ++r) std::fill(dst + r * p.n + c0, dst + r * p.n + c1, 0.f);
          return;
        }
        const int64_t slivers = (p.m + kRows - 1) / kRows;
        ettin::Floats apack = ettin::Alloc(slivers * kRows * kChunk), bpack = ettin::Alloc(kChunk * kCols);
        p.Block(0, p.m, c0, c1, k0, k1, kChunk, dst, nullptr, apack.get(), bpack.get());
      });
      if (groups > 1) {
        ettin::ParallelFor(pool, p.m, [&](int64_t r, int) {
          float* row = p.c + r * p.n;
          for (int64_t g = 1; g < groups; ++g) {
            const float* add = partial.get() + (g - 1) * p.m * p.n + r * p.n;
            for (int64_t j = 0; j < p.n; ++j) row[j] += add[j];
          }
        });
      }
      return;
    }
    // y = x W and dx = g W^T: tasks are blocks of kBlockRows rows of C; B (the weight) is packed once, all of it,
    // and shared by every task.
    ettin::Floats panels = ettin::Alloc(p.kdim * p.n);
    ettin::ParallelFor(pool, p.n / kCols, [&](int64_t j, int) {
      p.PackPanel(j * kCols, 0, p.kdim, panels.get() + j * p.kdim * kCols);
    });
    const int64_t chunks = (p.kdim + kMaxChunk - 1) / kMaxChunk, chunk = (p.kdim + chunks - 1) / chunks;
    const int64_t row_blocks = (p.m + kBlockRows - 1) / kBlockRows;
    ettin::ParallelFor(pool, row_blocks, [&](int64_t task, int) {
      const int64_t r0 = task * kBlockRows, r1 = std::min(p.m, r0 + kBlockRows);
      ettin::Floats apack = ettin::Alloc(kBlockRows * chunk);
      p.Block(r0, r1, 0, p.n, 0, p.kdim, chunk, p.c, panels.get(), apack.get(), nullptr);
    });
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemm, GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lhs
                                  .Arg<ffi::Buffer<ffi::F32>>()   // rhs
                                  .Attr<int64_t>("form")          // 0: lhs rhs, 1: lhs rhs^T, 2: lhs^T rhs
                                  .Ret<ffi::Buffer<ffi::F32>>());  // the product
