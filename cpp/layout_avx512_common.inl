// Shared by the AVX-512 layout kernels (kernels_avx512_layout.cpp) and the AMX ones
// (kernels_amx.inl): the execution layout's decode to VNNI operands, the int64 store of int32
// lanes, the exact float epilogue of a strip and the per-thread decode buffer. Included inside
// each file's own namespace, in translation units built with the AVX-512 flags only.
// (No include guard: each including file gets its own copy, in an anonymous namespace.)
#include "layout_common.inl"

namespace {

// One group (4 K codes x 16 columns) of a chunk of bits*64 bytes, as the vpdpbusd s8 operand.
// A part of width W at bit position P of the code, starting at vector V: one load, one
// 16-bit shift (bits never cross a byte after the mask) and one and.
template <int W, int P, int V, int G>
inline __m512i part(const int8_t* ch) {
  constexpr int per = 8 / W, sp = (G % per) * W;
  const __m512i x = _mm512_loadu_si512(ch + (V + G / per) * 64);
  __m512i y = x;
  if constexpr (P > sp) y = _mm512_slli_epi16(x, unsigned(P - sp));
  if constexpr (P < sp) y = _mm512_srli_epi16(x, unsigned(sp - P));
  return _mm512_and_si512(y, _mm512_set1_epi8(char(((1 << W) - 1) << P)));
}

template <int BITS, int G>
inline __m512i decode(const int8_t* ch) {
  if constexpr (BITS == 8) return _mm512_loadu_si512(ch + G * 64);
  else if constexpr (BITS == 1 || BITS == 2 || BITS == 4) return part<BITS, 0, 0, G>(ch);
  else if constexpr (BITS == 3) return _mm512_or_si512(part<2, 0, 0, G>(ch), part<1, 2, 2, G>(ch));
  else if constexpr (BITS == 5) return _mm512_or_si512(part<4, 0, 0, G>(ch), part<1, 4, 4, G>(ch));
  else if constexpr (BITS == 6) return _mm512_or_si512(part<4, 0, 0, G>(ch), part<2, 4, 4, G>(ch));
  else return _mm512_or_si512(_mm512_or_si512(part<4, 0, 0, G>(ch), part<2, 4, 4, G>(ch)), part<1, 6, 6, G>(ch));
}

// Where the int32 lanes go: C row (int64), its columns' count, and the base the first K
// block adds to (rowterm[i] + colterm[j] when set, else C itself).
struct Out {
  int64_t* c;
  int64_t nc;
  int shift;
  const int64_t* col;  // colterm at this row's first column, or null
  int64_t row;         // rowterm[i]
};

__attribute__((always_inline)) inline Out out_at(int64_t* C, int64_t ldc, int64_t i, int64_t j0, int64_t nc, int shift, const int64_t* rowterm,
                  const int64_t* colterm, bool first) {
  const bool base = first && rowterm;
  return Out{C + i * ldc + j0, nc - j0, shift, base ? colterm + j0 : nullptr, base ? rowterm[i] : 0};
}

// o.c[0..nc) = base + (the 16 int32 lanes of acc << shift) (column = lane), as int64
__attribute__((always_inline)) inline void add_lanes(__m512i acc, const Out& o) {
  for (int h = 0; h < 2; ++h) {
    const int64_t j = h * 8;
    if (j >= o.nc) return;
    const __mmask8 m = o.nc - j >= 8 ? __mmask8(0xFF) : __mmask8((1u << (o.nc - j)) - 1u);
    const __m256i part = h ? _mm512_extracti64x4_epi64(acc, 1) : _mm512_castsi512_si256(acc);
    const __m512i base = o.col ? _mm512_add_epi64(_mm512_maskz_loadu_epi64(m, o.col + j), _mm512_set1_epi64(o.row))
                               : _mm512_maskz_loadu_epi64(m, o.c + j);
    _mm512_mask_storeu_epi64(o.c + j, m, _mm512_add_epi64(base, _mm512_slli_epi64(_mm512_cvtepi32_epi64(part), unsigned(o.shift))));
  }
}

// A strip's float epilogue (layout_common.inl, ColBlock), 8 columns per step.
// FOLDED: the lanes already hold the whole integer total (the kernel started its accumulators
// at rowterm[i] + colterm[j], see fold_terms), so no shift and no term additions.
template <bool AR, bool BR, bool BIAS, bool FOLDED>
void store_strip_f32(const int32_t* tile, int rows, const LayoutEpilogue& ep, const int64_t* rowterm,
                     const ColBlock& cb, int64_t nc, int shift) {
  const __m512d seg = _mm512_set1_pd(ep.segscale), scale = _mm512_set1_pd(double(int64_t(1) << shift));
  // ep's arrays as locals: the stores (may_alias vector types) would make GCC reload them
  const int64_t* const ocol = ep.ocol;
  const uint8_t* const run = ep.run;
  const float* const bias = ep.bias;
  // 8 outputs of row i from column j: the float values (m: the live lanes)
  auto values = [&](int i, int64_t j, __mmask8 m, __m512d row, __m512d ar) {
    __m512d p = _mm512_cvtepi32_pd(_mm256_load_si256(reinterpret_cast<const __m256i*>(tile + i * 64 + j)));
    __m512d t = p;
    if constexpr (!FOLDED) {
      if (shift) p = _mm512_mul_pd(p, scale);
      t = _mm512_add_pd(p, _mm512_add_pd(row, _mm512_load_pd(cb.colterm + j)));
    }
    // 0.0 + t * segscale, rounded once as the driver's mul then add (t != 0 is an integer, so
    // the product never underflows to a signed zero the add would turn to +0)
    __m512d v = _mm512_fmadd_pd(t, seg, _mm512_setzero_pd());
    if constexpr (AR) v = _mm512_mul_pd(v, ar);
    if constexpr (BR) v = _mm512_mul_pd(v, _mm512_load_pd(cb.b_row + j));
    __m256 f = _mm512_cvtpd_ps(v);
    if constexpr (BIAS) f = _mm256_add_ps(f, _mm256_maskz_loadu_ps(m, bias + j));
    return f;
  };
  const int64_t whole = nc / 8 * 8;
  const __mmask8 tail = __mmask8((1u << (nc - whole)) - 1u);
  for (int i = 0; i < rows; ++i) {
    const int64_t o = ep.arow[i];
    float* out = ep.out + o * ep.ldo;
    const __m512d row = _mm512_set1_pd(double(rowterm[i]));
    const __m512d ar = _mm512_set1_pd(AR ? double(ep.a_row[o]) : 1.0);
    if (cb.contiguous) {  // one run of columns: plain stores, no per-step column lookups
      float* dst = out + ocol[0];
      for (int64_t j = 0; j < whole; j += 8) _mm256_storeu_ps(dst + j, values(i, j, 0xFF, row, ar));
      if (tail) _mm256_mask_storeu_ps(dst + whole, tail, values(i, whole, tail, row, ar));
      continue;
    }
    for (int64_t j = 0; j < nc; j += 8) {
      const __mmask8 m = j < whole ? __mmask8(0xFF) : tail;
      const __m256 f = values(i, j, m, row, ar);
      if (run[j / 8]) {
        _mm256_mask_storeu_ps(out + ocol[j], m, f);
      } else {  // scattered columns: scalar stores (vscatterqps is microcoded on Zen 4)
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, f);
        for (int64_t q = 0; q < 8 && j + q < nc; ++q) out[ocol[j + q]] = tmp[q];
      }
    }
  }
}

void store_strip(const int32_t* tile, int rows, const LayoutEpilogue& ep, const int64_t* rowterm, const ColBlock& cb,
                 int64_t nc, int shift, bool folded = false) {
  const int k = (ep.a_row ? 4 : 0) | (ep.b_row ? 2 : 0) | (ep.bias ? 1 : 0);
  auto go = [&](auto fold) {
    constexpr bool F = decltype(fold)::value;
    switch (k) {
      case 0: return store_strip_f32<false, false, false, F>(tile, rows, ep, rowterm, cb, nc, shift);
      case 1: return store_strip_f32<false, false, true, F>(tile, rows, ep, rowterm, cb, nc, shift);
      case 2: return store_strip_f32<false, true, false, F>(tile, rows, ep, rowterm, cb, nc, shift);
      case 3: return store_strip_f32<false, true, true, F>(tile, rows, ep, rowterm, cb, nc, shift);
      case 4: return store_strip_f32<true, false, false, F>(tile, rows, ep, rowterm, cb, nc, shift);
      case 5: return store_strip_f32<true, false, true, F>(tile, rows, ep, rowterm, cb, nc, shift);
      case 6: return store_strip_f32<true, true, false, F>(tile, rows, ep, rowterm, cb, nc, shift);
      default: return store_strip_f32<true, true, true, F>(tile, rows, ep, rowterm, cb, nc, shift);
    }
  };
  if (folded) go(std::true_type{});
  else go(std::false_type{});
}

// Whether a kernel may start its int32 accumulators at rowterm[i] + colterm[j] (each cut to
// int32), so that the epilogue adds nothing: without a shift. The sums then run modulo 2^32
// and end at the exact total, which int32 holds: it is the sum of K value products of at
// most 255 * 255 each, and an epilogue needs K <= kLayoutEpilogueMaxK (2^15).
inline bool fold_terms(const int64_t* rowterm, const int64_t* colterm, int shift) {
  static_assert(int64_t(255) * 255 * kLayoutEpilogueMaxK < (int64_t(1) << 31), "totals past int32");
  return !shift && rowterm && colterm;
}

// Decodes tiles [t0, t0 + nt) of a 64-column block, chunks [c0, c0 + ncb) of each, into buf as
// plain VNNI operands [tile][group][64 bytes] (ts bytes per tile); tiles nt..3 are zeroed. A
// group's 64 bytes are 16 columns x 4 K codes: one vpdpbusd operand, one row of an AMX B tile.
template <int BITS>
void decode_block(const int8_t* L, int64_t tb, int64_t t0, int64_t nt, int64_t c0, int64_t ncb, int8_t* buf,
                  int64_t ts) {
  for (int64_t t = 0; t < 4; ++t) {
    int8_t* dst = buf + t * ts;
    if (t >= nt) {
      std::memset(dst, 0, size_t(ncb * 512));
      continue;
    }
    for (int64_t c = 0; c < ncb; ++c) {
      const int8_t* ch = L + (t0 + t) * tb + (c0 + c) * BITS * 64;
      for_groups([&](auto gc) {
        constexpr int G = decltype(gc)::value;
        _mm512_store_si512(dst + (c * 8 + G) * 64, decode<BITS, G>(ch));
      });
    }
  }
}

}  // namespace
