// Masked softmax attention with RoPE for fp32 training on CPU, forward and backward (flash-attention style): XLA
// FFI handlers used by the model's attention on one device of an AVX-512 CPU (ettin_jax/cpu_attention.py says
// when).
//
// qkv [B, T, 3, H, D] (the Wqkv projection's output as it is: no split, no heads-major copies), the rotate-half
// RoPE tables cos, sin [B, T, D], segment ids [B, T] and a band (back, ahead; -1 for unbounded): q and k are
// rotated as model.apply_rope does, and query i sees key j iff seg_i == seg_j, i - j <= back and j - i <= ahead
// (as attention.visible). Each (batch, head) is one task on the calling thread and XLA's intra-op pool; its rows
// are packed contiguous first ([T, D], rotated; K^T and V^T as [D, T]) so that every product below is one
// register-tiled kernel over 64 x 64 blocks that stay in L1/L2:
//   forward, per query block (64 rows; 32 for a band bounded on both sides) and the keys its band reaches (in
//     multiples of 32), in steps of up to 512 keys: S = Q K^T, the online softmax on S in place (row max,
//     rescale, exp, row sum; no masks computed where the block sees every key of the step), O += P V; then O / l
//     and lse = m + log l per row.
//   backward, per key block and each query block that reaches it: S = Q K^T, P = exp(S * scale - lse),
//     dP = dO V^T, dS = P (dP - delta) (delta = rowsum(dO * O)), dV += P^T dO, dK += dS^T Q, dQ += dS K (dQ for
//     the whole row kept by the task: no two tasks write the same gradient); dQ and dK are rotated back (the
//     transpose of RoPE) into dqkv [B, T, 3, H, D].
// Requirements (checked): T a multiple of 64, D a multiple of 32. A query that sees no key (never one of a
// self-attention, which sees itself) gets O = 0 and no gradient.
#if !defined(__AVX512F__)
#error "attention.cc needs AVX-512 (ettin_jax/cpu_attention.py checks the CPU before building it)"
#endif
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "pool.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ettin_attn {

using ettin::Alloc;
using ettin::Floats;

constexpr int64_t kBlock = 64;  // query and key rows per block (the forward's window layers: 32 query rows)
constexpr int64_t kKeys = 512;  // the forward's keys per step of its online softmax

struct Problem {
  int64_t b, t, h, d, back, ahead;  // back / ahead < 0: unbounded
  float scale;
  const int32_t* seg;
  const float *cos, *sin;  // [B, T, D]
  int64_t QkvRow() const { return 3 * h * d; }  // stride between tokens in qkv [B, T, 3, H, D]
  int64_t Row() const { return h * d; }         // ... and in o [B, T, H, D]
  int64_t QkvBase(int64_t bh) const { return (bh / h) * t * 3 * h * d + (bh % h) * d; }  // q of (batch, head)
  int64_t Base(int64_t bh) const { return (bh / h) * t * h * d + (bh % h) * d; }
  const float* Table(const float* tab, int64_t bh) const { return tab + (bh / h) * t * d; }
};

// C[MR x 32] (=, or += with acc) sum_k A[i * ars + k * aks] B[k * ldb + 0 .. 32).
template <int MR>
inline void Tile(int64_t kdim, const float* a, int64_t ars, int64_t aks, const float* b, int64_t ldb, float* c,
                 int64_t ldc, bool acc) {
  __m512 c0[MR], c1[MR];
  for (int i = 0; i < MR; ++i) {
    c0[i] = acc ? _mm512_loadu_ps(c + i * ldc) : _mm512_setzero_ps();
    c1[i] = acc ? _mm512_loadu_ps(c + i * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < kdim; ++k) {
    const __m512 b0 = _mm512_loadu_ps(b + k * ldb), b1 = _mm512_loadu_ps(b + k * ldb + 16);
    const float* ak = a + k * aks;
    for (int i = 0; i < MR; ++i) {
      const __m512 x = _mm512_set1_ps(ak[i * ars]);
      c0[i] = _mm512_fmadd_ps(x, b0, c0[i]);
      c1[i] = _mm512_fmadd_ps(x, b1, c1[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm512_storeu_ps(c + i * ldc, c0[i]);
    _mm512_storeu_ps(c + i * ldc + 16, c1[i]);
  }
}

// C[m x n] (=, or +=) A B with A's element (i, k) at a[i * ars + k * aks]; m a multiple of 8, n of 32.
inline void Gemm(int64_t m, int64_t n, int64_t kdim, const float* a, int64_t ars, int64_t aks, const float* b,
                 int64_t ldb, float* c, int64_t ldc, bool acc) {
  for (int64_t j = 0; j < n; j += 32)
    for (int64_t i = 0; i < m; i += 8) Tile<8>(kdim, a + i * ars, ars, aks, b + j, ldb, c + i * ldc + j, ldc, acc);
}

// Which of keys k0 .. k0 + 16 query qi sees.
inline __mmask16 Visible(const Problem& pb, const int32_t* seg, int64_t qi, int64_t k0) {
  const __m512i ks = _mm512_loadu_si512(seg + k0);
  __mmask16 ok = _mm512_cmpeq_epi32_mask(ks, _mm512_set1_epi32(seg[qi]));
  const __m512i kidx = _mm512_add_epi32(_mm512_set1_epi32(int32_t(k0)),
                                        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  if (pb.back >= 0)  // qi - k <= back  <=>  k >= qi - back
    ok &= _mm512_cmpge_epi32_mask(kidx, _mm512_set1_epi32(int32_t(qi - pb.back)));
  if (pb.ahead >= 0)  // k - qi <= ahead
    ok &= _mm512_cmple_epi32_mask(kidx, _mm512_set1_epi32(int32_t(qi + pb.ahead)));
  return ok;
}

// The query blocks that reach key block kb, [first, last].
inline void QueryBlocks(const Problem& pb, int64_t kb, int64_t* first, int64_t* last) {
  const int64_t nb = pb.t / kBlock, k0 = kb * kBlock, k1 = k0 + kBlock - 1;
  *first = pb.ahead < 0 ? 0 : std::max<int64_t>(0, (k0 - pb.ahead) / kBlock);
  *last = pb.back < 0 ? nb - 1 : std::min<int64_t>(nb - 1, (k1 + pb.back) / kBlock);
}

// dst[j * ds + i] = src[i * ss + j] for a 16 x 16 block
inline void Transpose16(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ss);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
  }
  for (int j = 0; j < 16; ++j) _mm512_storeu_ps(dst + j * ds, r[j]);
}
// The [T, D] rows of one (batch, head) at x (token stride `row`), packed contiguous; optionally rotated by the
// RoPE tables c, s [T, D] first (model.apply_rope: x cos + rotate_half(x) sin); optionally also transposed, [D, T].
// (D is a multiple of 32 and T of 64, checked: whole vectors and 16 x 16 blocks.)
inline void Pack(const Problem& pb, const float* x, int64_t row, const float* c, const float* s, float* out,
                 float* out_t) {
  const int64_t t = pb.t, d = pb.d, half = d / 2;
  for (int64_t i = 0; i < t; ++i) {
    const float* xi = x + i * row;
    float* oi = out + i * d;
    if (c == nullptr) {
      std::memcpy(oi, xi, sizeof(float) * d);
    } else {
      const float *ci = c + i * d, *si = s + i * d;
      for (int64_t j = 0; j < half; j += 16) {
        const __m512 lo = _mm512_loadu_ps(xi + j), hi = _mm512_loadu_ps(xi + j + half);
        _mm512_storeu_ps(oi + j, _mm512_fnmadd_ps(hi, _mm512_loadu_ps(si + j),
                                                  _mm512_mul_ps(lo, _mm512_loadu_ps(ci + j))));
        _mm512_storeu_ps(oi + j + half, _mm512_fmadd_ps(lo, _mm512_loadu_ps(si + j + half),
                                                        _mm512_mul_ps(hi, _mm512_loadu_ps(ci + j + half))));
      }
    }
  }
  if (out_t != nullptr)
    for (int64_t i = 0; i < t; i += 16)
      for (int64_t j = 0; j < d; j += 16) Transpose16(out + i * d + j, d, out_t + j * t + i, t);
}

// g [T, D] (the gradient of rotated rows) rotated back, the transpose of RoPE, into x (token stride `row`).
inline void Unrotate(const Problem& pb, const float* g, const float* c, const float* s, float* x, int64_t row) {
  const int64_t d = pb.d, half = d / 2;
  for (int64_t i = 0; i < pb.t; ++i) {
    const float *gi = g + i * d, *ci = c + i * d, *si = s + i * d;
    float* xi = x + i * row;
    for (int64_t j = 0; j < half; ++j) xi[j] = gi[j] * ci[j] + gi[j + half] * si[j + half];
    for (int64_t j = half; j < d; ++j) xi[j] = gi[j] * ci[j] - gi[j - half] * si[j - half];
  }
}

// Whether every query of [q0, q1) sees every key of [k0, k1): one segment and the band around all of them.
inline bool AllVisible(const Problem& pb, const int32_t* seg, int64_t q0, int64_t q1, int64_t k0, int64_t k1) {
  if (pb.back >= 0 && k0 < q1 - 1 - pb.back) return false;
  if (pb.ahead >= 0 && k1 - 1 > q0 + pb.ahead) return false;
  const int32_t s0 = seg[q0];
  for (int64_t i = q0; i < q1; ++i)
    if (seg[i] != s0) return false;
  for (int64_t j = k0; j < k1; ++j)
    if (seg[j] != s0) return false;
  return true;
}

void Forward(const Problem& pb, int64_t bh, const float* qkv, float* o, float* lse) {
  const int64_t t = pb.t, d = pb.d, base = pb.Base(bh), hd = pb.h * d;
  const float* q = qkv + pb.QkvBase(bh);
  const float *c = pb.Table(pb.cos, bh), *sn = pb.Table(pb.sin, bh);
  const int32_t* seg = pb.seg + (bh / pb.h) * t;
  // A band bounded on both sides (the encoder's windows) takes 32-row query blocks: their keys, rounded out to
  // multiples of 32, are 160 for a +-64 window where 64-row blocks would take 192.
  const int64_t qblock = pb.back >= 0 && pb.ahead >= 0 ? 32 : kBlock;
  Floats qp = Alloc(t * d), kp = Alloc(t * d), kt = Alloc(d * t), vp = Alloc(t * d), s = Alloc(qblock * kKeys),
         acc = Alloc(qblock * d), m = Alloc(qblock), l = Alloc(qblock);
  Pack(pb, q, pb.QkvRow(), c, sn, qp.get(), nullptr);
  Pack(pb, q + hd, pb.QkvRow(), c, sn, kp.get(), kt.get());
  Pack(pb, q + 2 * hd, pb.QkvRow(), nullptr, nullptr, vp.get(), nullptr);
  const __m512 scale = _mm512_set1_ps(pb.scale), neg_inf = _mm512_set1_ps(-INFINITY);
  for (int64_t q0 = 0; q0 < t; q0 += qblock) {
    const int64_t q1 = q0 + qblock;
    // The keys any of these queries may see, rounded out to multiples of 32, in chunks of up to kKeys: per chunk
    // S = Q K^T, the online softmax on S in place (row max, rescale, exp, row sum), O += P V.
    const int64_t kbegin = pb.back < 0 ? 0 : std::max<int64_t>(0, (q0 - pb.back) / 32 * 32);
    const int64_t kend = pb.ahead < 0 ? t : std::min<int64_t>(t, (q1 - 1 + pb.ahead + 32) / 32 * 32);
    std::fill(m.get(), m.get() + qblock, -INFINITY);
    std::fill(l.get(), l.get() + qblock, 0.f);
    for (int64_t k0 = kbegin; k0 < kend; k0 += kKeys) {
      const int64_t n = std::min(kKeys, kend - k0);
      const bool all = AllVisible(pb, seg, q0, q1, k0, k0 + n);
      Gemm(qblock, n, d, qp.get() + q0 * d, d, 1, kt.get() + k0, t, s.get(), n, false);
      for (int64_t i = 0; i < qblock; ++i) {
        float* row = s.get() + i * n;
        __mmask16 ok[kKeys / 16], nan = 0;
        __m512 mx = neg_inf;
        for (int64_t j = 0; j < n; j += 16) {
          ok[j / 16] = all ? __mmask16(0xffff) : Visible(pb, seg, q0 + i, k0 + j);
          const __m512 x = _mm512_mask_mul_ps(neg_inf, ok[j / 16], _mm512_loadu_ps(row + j), scale);
          _mm512_storeu_ps(row + j, x);
          mx = _mm512_max_ps(mx, x);
          nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        }
        // (max_ps drops a NaN met after a larger or masked score: NaNs are tracked on their own)
        const float bm = nan ? NAN : _mm512_reduce_max_ps(mx);
        const float mnew = bm > m[i] || std::isnan(bm) ? bm : m[i];  // a NaN score makes the row NaN
        if (mnew == -INFINITY) {  // nothing visible yet in this row: P = 0
          std::fill(row, row + n, 0.f);
          continue;
        }
        const __m512 mv = _mm512_set1_ps(mnew);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
          // masked scores are -inf: exp gives ~1e-38 there (ettin::Exp), so they are zeroed
          const __m512 p = _mm512_maskz_mov_ps(ok[j / 16], ettin::Exp(_mm512_sub_ps(_mm512_loadu_ps(row + j), mv)));
          _mm512_storeu_ps(row + j, p);
          sum = _mm512_add_ps(sum, p);
        }
        const float alpha = std::exp(m[i] - mnew);  // 0 for the row's first visible chunk
        l[i] = l[i] * alpha + _mm512_reduce_add_ps(sum);
        m[i] = mnew;
        if (k0 > kbegin && alpha != 1.f) {  // (the first chunk's product overwrites acc)
          const __m512 a = _mm512_set1_ps(alpha);
          for (int64_t j = 0; j < d; j += 16)
            _mm512_storeu_ps(acc.get() + i * d + j, _mm512_mul_ps(a, _mm512_loadu_ps(acc.get() + i * d + j)));
        }
      }
      Gemm(qblock, d, n, s.get(), n, 1, vp.get() + k0 * d, d, acc.get(), d, k0 > kbegin);
    }
    for (int64_t i = 0; i < qblock; ++i) {
      const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
      float* out = o + base + (q0 + i) * pb.Row();
      for (int64_t j = 0; j < d; ++j) out[j] = acc[i * d + j] * inv;
      lse[bh * t + q0 + i] = l[i] > 0.f ? m[i] + std::log(l[i]) : INFINITY;
    }
  }
}

void Backward(const Problem& pb, int64_t bh, const float* qkv, const float* o, const float* lse, const float* dout,
              float* dqkv) {
  const int64_t t = pb.t, d = pb.d, base = pb.Base(bh), hd = pb.h * d;
  const float* q = qkv + pb.QkvBase(bh);
  const float *c = pb.Table(pb.cos, bh), *sn = pb.Table(pb.sin, bh);
  const int32_t* seg = pb.seg + (bh / pb.h) * t;
  const float* lrow = lse + bh * t;
  Floats qp = Alloc(t * d), kp = Alloc(t * d), kt = Alloc(d * t), vp = Alloc(t * d), vt = Alloc(d * t),
         dop = Alloc(t * d), delta = Alloc(t), dqa = Alloc(t * d), dka = Alloc(t * d), dva = Alloc(t * d),
         p = Alloc(kBlock * kBlock), ds = Alloc(kBlock * kBlock);
  Pack(pb, q, pb.QkvRow(), c, sn, qp.get(), nullptr);
  Pack(pb, q + hd, pb.QkvRow(), c, sn, kp.get(), kt.get());
  Pack(pb, q + 2 * hd, pb.QkvRow(), nullptr, nullptr, vp.get(), vt.get());
  Pack(pb, dout + base, pb.Row(), nullptr, nullptr, dop.get(), nullptr);
  for (int64_t i = 0; i < t; ++i) {
    const float* oi = o + base + i * pb.Row();
    float acc = 0.f;
    for (int64_t j = 0; j < d; ++j) acc += oi[j] * dop[i * d + j];
    delta[i] = acc;
  }
  std::fill(dqa.get(), dqa.get() + t * d, 0.f);
  const __m512 scale = _mm512_set1_ps(pb.scale);
  for (int64_t kb = 0; kb < t / kBlock; ++kb) {
    const int64_t k0 = kb * kBlock;
    float *dkb = dka.get() + k0 * d, *dvb = dva.get() + k0 * d;
    std::fill(dkb, dkb + kBlock * d, 0.f);
    std::fill(dvb, dvb + kBlock * d, 0.f);
    int64_t first, last;
    QueryBlocks(pb, kb, &first, &last);
    for (int64_t qb = first; qb <= last; ++qb) {
      const int64_t q0 = qb * kBlock;
      Gemm(kBlock, kBlock, d, qp.get() + q0 * d, d, 1, kt.get() + k0, t, p.get(), kBlock, false);    // S
      Gemm(kBlock, kBlock, d, dop.get() + q0 * d, d, 1, vt.get() + k0, t, ds.get(), kBlock, false);  // dP
      for (int64_t i = 0; i < kBlock; ++i) {
        const __m512 lv = _mm512_set1_ps(lrow[q0 + i]), dl = _mm512_set1_ps(delta[q0 + i]);
        for (int c = 0; c < kBlock / 16; ++c) {
          float* pr = p.get() + i * kBlock + 16 * c;
          float* dr = ds.get() + i * kBlock + 16 * c;
          const __mmask16 ok = Visible(pb, seg, q0 + i, k0 + 16 * c);
          const __m512 pv = _mm512_maskz_mov_ps(
              ok, ettin::Exp(_mm512_fmsub_ps(_mm512_loadu_ps(pr), scale, lv)));
          _mm512_storeu_ps(pr, pv);
          _mm512_storeu_ps(dr, _mm512_mul_ps(_mm512_mul_ps(pv, _mm512_sub_ps(_mm512_loadu_ps(dr), dl)), scale));
        }
      }
      Gemm(kBlock, d, kBlock, p.get(), 1, kBlock, dop.get() + q0 * d, d, dvb, d, true);   // dV += P^T dO
      Gemm(kBlock, d, kBlock, ds.get(), 1, kBlock, qp.get() + q0 * d, d, dkb, d, true);   // dK += dS^T Q
      Gemm(kBlock, d, kBlock, ds.get(), kBlock, 1, kp.get() + k0 * d, d, dqa.get() + q0 * d, d, true);  // dQ
    }
  }
  float* dq = dqkv + pb.QkvBase(bh);
  Unrotate(pb, dqa.get(), c, sn, dq, pb.QkvRow());
  Unrotate(pb, dka.get(), c, sn, dq + hd, pb.QkvRow());
  for (int64_t i = 0; i < t; ++i) std::memcpy(dq + 2 * hd + i * pb.QkvRow(), dva.get() + i * d, sizeof(float) * d);
}

}  // namespace ettin_attn

namespace ffi = xla::ffi;

namespace {

// The problem of qkv [B, T, 3, H, D], cos and sin [B, T, D] and seg [B, T], or an error.
ffi::ErrorOr<ettin_attn::Problem> Describe(const ffi::Buffer<ffi::F32>& qkv, const ffi::Buffer<ffi::F32>& cos,
                                          const ffi::Buffer<ffi::F32>& sin, const ffi::Buffer<ffi::S32>& seg,
                                          int64_t back, int64_t ahead) {
  const auto dims = qkv.dimensions();
  if (dims.size() != 5 || dims[2] != 3)
    return ffi::Unexpected(ffi::Error::InvalidArgument("attention: qkv must be [B, T, 3, H, D]"));
  ettin_attn::Problem pb{dims[0], dims[1], dims[3], dims[4], back, ahead, float(1.0 / std::sqrt(double(dims[4]))),
                         seg.typed_data(), cos.typed_data(), sin.typed_data()};
  if (seg.element_count() != size_t(pb.b * pb.t))
    return ffi::Unexpected(ffi::Error::InvalidArgument("attention: segment ids must be [B, T]"));
  if (cos.element_count() != size_t(pb.b * pb.t * pb.d) || sin.element_count() != cos.element_count())
    return ffi::Unexpected(ffi::Error::InvalidArgument("attention: the RoPE tables must be [B, T, D]"));
  if (pb.t % ettin_attn::kBlock != 0 || pb.d % 32 != 0 || pb.t == 0)
    return ffi::Unexpected(ffi::Error::InvalidArgument("attention: T must be a positive multiple of 64, D of 32"));
  if (pb.t > (int64_t(1) << 30))
    return ffi::Unexpected(ffi::Error::InvalidArgument("attention: rows too long for 32-bit key indices"));
  return pb;
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> cos,
                       ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::S32> seg, int64_t back, int64_t ahead,
                       ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse) {
  auto pb = Describe(qkv, cos, sin, seg, back, ahead);
  if (pb.has_error()) return pb.error();
  return ettin::OutOfMemoryAsError("attention", [&] {
    ettin::ParallelFor(pool, pb->b * pb->h, [&](int64_t bh, int) {
      ettin_attn::Forward(*pb, bh, qkv.typed_data(), o->typed_data(), lse->typed_data());
    });
  });
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> cos,
                        ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::F32> o,
                        ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, int64_t back, int64_t ahead,
                        ffi::ResultBuffer<ffi::F32> dqkv) {
  auto pb = Describe(qkv, cos, sin, seg, back, ahead);
  if (pb.has_error()) return pb.error();
  return ettin::OutOfMemoryAsError("attention", [&] {
    ettin::ParallelFor(pool, pb->b * pb->h, [&](int64_t bh, int) {
      ettin_attn::Backward(*pb, bh, qkv.typed_data(), o.typed_data(), lse.typed_data(), dout.typed_data(),
                           dqkv->typed_data());
    });
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttentionForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // qkv [B, T, 3, H, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cos [B, T, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sin [B, T, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // segment ids [B, T]
                                  .Attr<int64_t>("back")          // -1: unbounded
                                  .Attr<int64_t>("ahead")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // o [B, T, H, D]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // lse [B, H, T]

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttentionBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // qkv
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cos
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sin
                                  .Arg<ffi::Buffer<ffi::S32>>()   // segment ids
                                  .Arg<ffi::Buffer<ffi::F32>>()   // o
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()   // do
                                  .Attr<int64_t>("back")
                                  .Attr<int64_t>("ahead")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dqkv [B, T, 3, H, D]
