// Reference kernels, included by each ISA translation unit. Internal linkage
// (anonymous namespace) so a copy built with AVX-512 flags can never be picked by
// the linker for the scalar table.
#include <cstdint>
#include <cstring>

#include "kernels.h"
#include "wlayout.h"

namespace {

inline int popcount64(uint64_t x) { return __builtin_popcountll(x); }

inline void ref_bitserial(const uint64_t* A, int pa, int64_t a_plane_stride, int64_t M,
                   const uint64_t* B, int pb, int64_t b_plane_stride, int64_t N, int64_t kw,
                   int64_t* C, int64_t ldc, int shift) {
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      int64_t acc = 0;
      for (int p = 0; p < pa; ++p) {
        const uint64_t* a = A + p * a_plane_stride + i * kw;
        for (int q = 0; q < pb; ++q) {
          const uint64_t* b = B + q * b_plane_stride + j * kw;
          int64_t s = 0;
          for (int64_t w = 0; w < kw; ++w) s += popcount64(a[w] & b[w]);
          acc += s << (p + q);
        }
      }
      C[i * ldc + j] += acc << shift;
    }
  }
}

inline void ref_pack_planes(const uint8_t* codes, int64_t rows, int64_t klen, int64_t ld, int bits,
                     int64_t kw, uint64_t* out) {
  std::memset(out, 0, sizeof(uint64_t) * size_t(bits) * size_t(rows) * size_t(kw));
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = codes + r * ld;
    for (int64_t k = 0; k < klen; ++k) {
      const uint64_t c = row[k];
      const int64_t w = k >> 6;
      const int sh = int(k & 63);
      for (int p = 0; p < bits; ++p) out[(int64_t(p) * rows + r) * kw + w] |= ((c >> p) & 1u) << sh;
    }
  }
}

inline void ref_unpack_planes(const uint64_t* planes, int bits, int64_t plane_stride, int64_t rows, int64_t kw,
                       uint8_t* out, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < kw * 64; ++k) {
      unsigned c = 0;
      for (int p = 0; p < bits; ++p)
        c |= unsigned((planes[p * plane_stride + r * kw + (k >> 6)] >> (k & 63)) & 1u) << p;
      out[r * ldo + k] = uint8_t(c);
    }
}

// One code of a weight execution layout (cpp/wlayout.h) tile: row j, position k; 8-bit
// codes come back as stored (u - 128), the value the layout kernels multiply.
inline int ref_layout_code(const int8_t* tile, int bits, int64_t k, int j) {
  const auto& widths = soniq::kLayoutPartWidths;
  const uint8_t* ch = reinterpret_cast<const uint8_t*>(tile) + (k / 32) * bits * 64;
  const int g = int(k % 32) / 4, byte = j * 4 + int(k % 4);
  if (bits == 8) return int(tile[(k / 32) * 512 + g * 64 + byte]);
  unsigned u = 0;
  for (int q = 0, pos = 0; q < 3 && widths[bits][q]; pos += widths[bits][q], ++q) {
    const int w = widths[bits][q], per = 8 / w;
    u |= ((unsigned(ch[(pos + g / per) * 64 + byte]) >> ((g % per) * w)) & ((1u << w) - 1u)) << pos;
  }
  return int(u);
}

// Scalar reference of the layout kernels (LayoutGemmFn): one code at a time.
inline void ref_layout_gemm(const uint8_t* A, int64_t lda, int64_t M, const int8_t* L, int bits, int64_t N,
                            int64_t kw, int64_t* C, int64_t ldc, int shift, const int64_t* rowterm,
                            const int64_t* colterm, const soniq::LayoutEpilogue* ep) {
  const int64_t tb = 2 * kw * bits * 64;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t n = 0; n < N; ++n) {
      int64_t acc = 0;
      for (int64_t k = 0; k < kw * 64; ++k)
        acc += int64_t(A[i * lda + k]) * ref_layout_code(L + (n / 16) * tb, bits, k, int(n % 16));
      const int64_t base = rowterm ? rowterm[i] + colterm[n] : C[i * ldc + n];
      const int64_t total = base + acc * (int64_t(1) << shift);
      if (!ep) {
        C[i * ldc + n] = total;
        continue;
      }
      double v = 0.0 + double(total) * ep->segscale;  // the driver's epilogue, in its order
      if (ep->a_row) v *= double(ep->a_row[ep->arow[i]]);
      if (ep->b_row) v *= double(ep->b_row[n]);
      float o = float(v);
      if (ep->bias) o = o + ep->bias[n];
      ep->out[ep->arow[i] * ep->ldo + ep->ocol[n]] = o;
    }
}

inline float ref_clamp(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Codes of one word are counted from its planes (popcount << p): exact, and NaN-proof.
inline int64_t plane_sum(const uint64_t* planes, int bits) {
  int64_t s = 0;
  for (int p = 0; p < bits; ++p) s += int64_t(popcount64(planes[p])) << p;
  return s;
}

// The 64 floats of word w in packed order (times mul, each product one float32 multiply,
// indexed as x, when mul is set): read in place when the word is whole, not gathered and not
// multiplied, else gathered / copied into tmp and padded with -inf (code 0 in every encoding).
inline const float* word_floats(const float* x, const int64_t* idx, int64_t klen, int64_t w, float* tmp,
                                const float* mul = nullptr) {
  const int64_t j0 = w * 64, n = klen - j0 < 64 ? klen - j0 : 64;
  if (!idx && !mul && n == 64) return x + j0;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t k = idx ? idx[j0 + j] : j0 + j;
    tmp[j] = mul ? x[k] * mul[k] : x[k];
  }
  for (int64_t j = n; j < 64; ++j) tmp[j] = -__builtin_huge_valf();
  return tmp;
}

// One code of ref_quant_pack's rounding (x not NaN).
inline unsigned ref_code(float x, float inv, float lo, float hi, int alpha) {
  const float M = 12582912.0f;  // 1.5 * 2^23: (t + M) - M rounds half to even, as quantize.cpp
  if (alpha == 1) return unsigned(ref_clamp((ref_clamp(x * inv, lo - 1.0f, hi + 1.0f) + M) - M, lo, hi) - lo);
  return unsigned(ref_clamp((ref_clamp((x * inv + 1.0f) * 0.5f, -2.0f, 3.0f) + M) - M, 0.0f, 1.0f));
}

// QuantBytesFn: the codes of ref_quant_pack as bytes (NaN: code 0, *nan set), of x * mul
// (a float32 product of its own) when mul is set.
inline int64_t ref_quant_bytes(const float* x, const float* mul, const int64_t* idx, int64_t klen, int64_t kw,
                               float inv, float lo, float hi, int alpha, uint8_t* out, bool* nan) {
  int64_t sum = 0;
  bool saw_nan = false;
  for (int64_t j = 0; j < klen; ++j) {
    const int64_t k = idx ? idx[j] : j;
    float v = x[k];
    if (mul) v = v * mul[k];
    const unsigned c = v != v ? 0u : ref_code(v, inv, lo, hi, alpha);
    saw_nan |= v != v;
    out[j] = uint8_t(c);
    sum += c;
  }
  for (int64_t j = klen; j < kw * 64; ++j) out[j] = 0;
  if (saw_nan) *nan = true;
  return sum;
}

inline int64_t ref_quant_pack(const float* x_, const int64_t* idx, int64_t klen, int64_t kw, float inv, float lo,
                              float hi, int alpha, int bits, uint64_t* out, int64_t plane_stride, bool* nan) {
  const float M = 12582912.0f;  // 1.5 * 2^23: (t + M) - M rounds half to even, as quantize.cpp
  int64_t sum = 0;
  bool saw_nan = false;
  float tmp[64];
  for (int64_t w = 0; w < kw; ++w) {
    const float* xs = word_floats(x_, idx, klen, w, tmp);
    uint64_t planes[8] = {};
    for (int j = 0; j < 64; ++j) {
      const float x = xs[j];
      float code;
      if (alpha == 1) {
        code = ref_clamp((ref_clamp(x * inv, lo - 1.0f, hi + 1.0f) + M) - M, lo, hi) - lo;
      } else {
        code = ref_clamp((ref_clamp((x * inv + 1.0f) * 0.5f, -2.0f, 3.0f) + M) - M, 0.0f, 1.0f);
      }
      if (x != x) {  // NaN: no code (converting it to an integer would be undefined)
        saw_nan = true;
        continue;
      }
      const unsigned c = unsigned(code);
      for (int p = 0; p < bits; ++p) planes[p] |= uint64_t((c >> p) & 1u) << j;
    }
    for (int p = 0; p < bits; ++p) out[p * plane_stride + w] = planes[p];
    sum += plane_sum(planes, bits);
  }
  if (saw_nan) *nan = true;
  return sum;
}

// The column merge (kernels.h ColumnMerge) as the plain gather through inv: the scalar table's
// kernel, and the fast ones' path where the masks do not apply.
inline void ref_merge_columns(const float* src, int64_t lds, int64_t rows, const soniq::ColumnMerge& cm, float* out,
                              int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cm.n; ++c) out[r * ldo + c] = src[r * lds + cm.inv[c]];
}

}  // namespace
