// AVX2 path (built with -mavx2 -mfma -mbmi2 -mpopcnt). Runs only when cpuid says so.
// Never put AVX-512 intrinsics here: this object must run on AVX2-only CPUs
// (tests/test_cpu_kernels.py checks its disassembly for zmm registers).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "bitserial_tiles.inl"
#include "gelu.h"
#include "trellis.h"
#include "hadamard.h"
#include "kernels_avx2_layout.h"
#include "kernels_ref.inl"

namespace soniq {
namespace {

// ---- bit-serial: scalar 64-bit popcnt, RM x RN rows per inner loop ---------------------
// Zen/Intel run 3-4 popcnt per cycle; each loaded A word is reused RN times and each B
// word RM times. Counts of one plane pair fit in 32 bits for kw < 2^26.
template <int RM, int RN>
inline void bs_micro(const uint64_t* A, int pa, int64_t sa, const uint64_t* B, int pb, int64_t sb,
                     int64_t kw, int64_t kw_blk, int64_t* C, int64_t ldc, int shift) {
  int64_t acc[RM][RN] = {};
  for (int p = 0; p < pa; ++p) {
    for (int q = 0; q < pb; ++q) {
      const uint64_t* a = A + p * sa;
      const uint64_t* b = B + q * sb;
      uint64_t s[RM][RN] = {};
      for (int64_t w = 0; w < kw_blk; ++w) {
        uint64_t av[RM];
        for (int i = 0; i < RM; ++i) av[i] = a[i * kw + w];
        for (int j = 0; j < RN; ++j) {
          const uint64_t bv = b[j * kw + w];
          for (int i = 0; i < RM; ++i) s[i][j] += uint64_t(_mm_popcnt_u64(av[i] & bv));
        }
      }
      for (int i = 0; i < RM; ++i)
        for (int j = 0; j < RN; ++j) acc[i][j] += int64_t(s[i][j]) << (p + q);
    }
  }
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < RN; ++j) C[i * ldc + j] += acc[i][j] << shift;
}

struct BsMicro {
  template <int RM, int RN>
  static void run(const uint64_t* A, int pa, int64_t sa, const uint64_t* B, int pb, int64_t sb, int64_t kw,
                  int64_t kw_blk, int64_t* C, int64_t ldc, int shift) {
    bs_micro<RM, RN>(A, pa, sa, B, pb, sb, kw, kw_blk, C, ldc, shift);
  }
};

void avx2_bitserial(const uint64_t* A, int pa, int64_t sa, int64_t M, const uint64_t* B, int pb,
                    int64_t sb, int64_t N, int64_t kw, int64_t* C, int64_t ldc, int shift) {
  bitserial_tiles<BsMicro, 3>(A, pa, sa, M, B, pb, sb, N, kw, C, ldc, shift);
}

// ---- codes -> bit planes: movemask of shifted code bytes gives 32 plane bits at once -----
void avx2_pack_planes(const uint8_t* codes, int64_t rows, int64_t klen, int64_t ld, int bits, int64_t kw,
                      uint64_t* out) {
  const int64_t plane = rows * kw;
  alignas(32) uint8_t tail[32];
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = codes + r * ld;
    uint64_t* o = out + r * kw;
    for (int64_t w = 0; w < kw; ++w) {
      uint32_t lohi[2][8];
      for (int h = 0; h < 2; ++h) {
        const int64_t k0 = w * 64 + h * 32;
        __m256i x;
        if (k0 + 32 <= klen) {
          x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k0));
        } else {
          std::memset(tail, 0, sizeof(tail));
          if (k0 < klen) std::memcpy(tail, row + k0, size_t(klen - k0));
          x = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
        }
        // bit p of every byte moved to the sign bit (16-bit shifts: neighbouring bytes'
        // bits shifted in land below bit 7 of each byte, so the sign bit is exact)
        for (int p = 0; p < bits; ++p)
          lohi[h][p] = uint32_t(_mm256_movemask_epi8(_mm256_slli_epi16(x, 7 - p)));
      }
      for (int p = 0; p < bits; ++p) o[p * plane + w] = uint64_t(lohi[0][p]) | (uint64_t(lohi[1][p]) << 32);
    }
  }
}

// ---- bit planes -> bytes ----------------------------------------------------------------
// 32 codes from plane bits [p0, p1) of one row; half = index of the 32-bit chunk.
inline __m256i expand32(const uint64_t* row, int64_t plane_stride, int p0, int p1, int64_t half) {
  const __m256i rep = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                       2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i sel = _mm256_set1_epi64x(int64_t(0x8040201008040201ULL));
  __m256i code = _mm256_setzero_si256();
  for (int p = p0; p < p1; ++p) {
    uint32_t bits;
    std::memcpy(&bits, reinterpret_cast<const uint32_t*>(row + p * plane_stride) + half, 4);
    __m256i x = _mm256_shuffle_epi8(_mm256_set1_epi32(int(bits)), rep);
    x = _mm256_cmpeq_epi8(_mm256_and_si256(x, sel), sel);
    code = _mm256_or_si256(code, _mm256_and_si256(x, _mm256_set1_epi8(char(1 << (p - p0)))));
  }
  return code;
}

void avx2_unpack_planes(const uint64_t* planes, int bits, int64_t plane_stride, int64_t rows, int64_t kw,
                        uint8_t* out, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < 2 * kw; ++h)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo + h * 32),
                          expand32(planes + r * kw, plane_stride, 0, bits, h));
}

// ---- fused activation quantize: 32 floats -> 32 byte codes in one ymm, in the order of
// operations of quantize.cpp (see avx512_quant_pack) ---------------------------------------
inline __m256 clamp_ps(__m256 v, __m256 lo, __m256 hi) { return _mm256_min_ps(_mm256_max_ps(v, lo), hi); }

struct Codes32 {
  __m256 vinv, M, c1lo, c1hi, c2lo, c2hi, off, one, half;
  bool a1;
  __m256 nanv = _mm256_setzero_ps();  // lanes that saw a NaN
  Codes32(float inv, float lo, float hi, int alpha) : a1(alpha == 1) {
    vinv = _mm256_set1_ps(inv), M = _mm256_set1_ps(12582912.0f);
    c1lo = _mm256_set1_ps(a1 ? lo - 1.0f : -2.0f), c1hi = _mm256_set1_ps(a1 ? hi + 1.0f : 3.0f);
    c2lo = _mm256_set1_ps(a1 ? lo : 0.0f), c2hi = _mm256_set1_ps(a1 ? hi : 1.0f);
    off = _mm256_set1_ps(a1 ? lo : 0.0f), one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
  }
  // codes of xs[0..32) (times ms[0..32), a float32 multiply each, when ms is set)
  __m256i operator()(const float* xs, const float* ms) {
    __m256i c[4];
    for (int i = 0; i < 4; ++i) {
      __m256 x = _mm256_loadu_ps(xs + 8 * i);
      if (ms) x = _mm256_mul_ps(x, _mm256_loadu_ps(ms + 8 * i));
      nanv = _mm256_or_ps(nanv, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
      __m256 t = _mm256_mul_ps(x, vinv);
      if (!a1) t = _mm256_mul_ps(_mm256_add_ps(t, one), half);
      t = _mm256_sub_ps(_mm256_add_ps(clamp_ps(t, c1lo, c1hi), M), M);
      c[i] = _mm256_cvttps_epi32(_mm256_sub_ps(clamp_ps(t, c2lo, c2hi), off));
    }
    const __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    return _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));  // undoes the per-lane packs
  }
  bool saw_nan() const { return _mm256_movemask_ps(nanv) != 0; }
};

// Quantize + pack: per 32 codes, one shift + vpmovmskb per bit plane gives half of that plane's word.
int64_t avx2_quant_pack(const float* x_, const int64_t* idx, int64_t klen, int64_t kw, float inv, float lo,
                        float hi, int alpha, int bits, uint64_t* out, int64_t plane_stride, bool* nan) {
  Codes32 codes(inv, lo, hi, alpha);
  int64_t sum = 0;
  alignas(32) float tmp[64];
  for (int64_t w = 0; w < kw; ++w) {
    const float* xs = word_floats(x_, idx, klen, w, tmp);
    const __m256i v[2] = {codes(xs, nullptr), codes(xs + 32, nullptr)};
    uint64_t planes[8];
    for (int p = 0; p < bits; ++p) {
      // bit p of every byte to its sign bit (16-bit shifts: carries from the low byte stay below bit 7)
      const __m128i sh = _mm_cvtsi32_si128(7 - p);
      const uint32_t lo32 = uint32_t(_mm256_movemask_epi8(_mm256_sll_epi16(v[0], sh)));
      const uint32_t hi32 = uint32_t(_mm256_movemask_epi8(_mm256_sll_epi16(v[1], sh)));
      planes[p] = uint64_t(lo32) | (uint64_t(hi32) << 32);
      out[p * plane_stride + w] = planes[p];
    }
    sum += plane_sum(planes, bits);
  }
  if (codes.saw_nan()) *nan = true;
  return sum;
}

// Activations straight to the layout kernels' A bytes (packed layers' fused path): the codes
// of avx2_quant_pack, without planes; their sum by vpsadbw. mul (smoothing factors): whole
// words read in place are multiplied in registers, gathered or partial ones get their
// products in word_floats (one float32 multiply each, as torch's x * mul).
int64_t avx2_quant_bytes(const float* x_, const float* mul, const int64_t* idx, int64_t klen, int64_t kw,
                         float inv, float lo, float hi, int alpha, uint8_t* out, bool* nan) {
  Codes32 codes(inv, lo, hi, alpha);
  __m256i sum = _mm256_setzero_si256();
  alignas(32) float tmp[64];
  for (int64_t w = 0; w < kw; ++w) {
    const int64_t j0 = w * 64;
    const bool in_place = !idx && klen - j0 >= 64;
    const float* xs = in_place ? x_ + j0 : word_floats(x_, idx, klen, w, tmp, mul);
    const float* ms = in_place && mul ? mul + j0 : nullptr;
    for (int h = 0; h < 2; ++h) {
      const __m256i v = codes(xs + h * 32, ms ? ms + h * 32 : nullptr);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j0 + h * 32), v);
      sum = _mm256_add_epi64(sum, _mm256_sad_epu8(v, _mm256_setzero_si256()));
    }
  }
  if (codes.saw_nan()) *nan = true;
  alignas(32) int64_t s[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(s), sum);
  return s[0] + s[1] + s[2] + s[3];
}

// ---- block Hadamard rotation of a row (cpp/hadamard.h), blocks of 8+: stages h < 8 within
// each vector (partner lane i ^ h by a permute; the lower lane keeps a + b, the upper one
// takes a - b), then h >= 8 across vectors: blocks of up to 64 columns in registers, larger
// ones stage by stage through `out`; the reference's operations in its order.
static inline __m256 avx2_hadamard8(__m256 v) {
  __m256 p = _mm256_permute_ps(v, 0xB1);  // h = 1
  v = _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xAA);
  p = _mm256_permute_ps(v, 0x4E);  // h = 2
  v = _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xCC);
  p = _mm256_permute2f128_ps(v, v, 0x01);  // h = 4
  return _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xF0);
}

template <int NV>  // one block of NV * 8 columns, in registers
static void avx2_hadamard_blocks(const float* x, int64_t k, float* out) {
  for (int64_t b = 0; b < k; b += NV * 8) {
    __m256 v[NV];
    for (int i = 0; i < NV; ++i) v[i] = avx2_hadamard8(_mm256_loadu_ps(x + b + 8 * i));
    // fully unrolled so that v[] stays in registers (rolled, GCC keeps it on the stack)
#pragma GCC unroll 8
    for (int h = 1; h < NV; h *= 2)  // h vectors = 8 h columns
#pragma GCC unroll 8
      for (int g = 0; g < NV; g += 2 * h)
#pragma GCC unroll 8
        for (int i = g; i < g + h; ++i) {
          const __m256 a = v[i], c = v[i + h];
          v[i] = _mm256_add_ps(a, c);
          v[i + h] = _mm256_sub_ps(a, c);
        }
    for (int i = 0; i < NV; ++i) _mm256_storeu_ps(out + b + 8 * i, v[i]);
  }
}

void avx2_hadamard_row(const float* x, int64_t k, int block, float* out) {
  switch (block) {
    case 8: return avx2_hadamard_blocks<1>(x, k, out);
    case 16: return avx2_hadamard_blocks<2>(x, k, out);
    case 32: return avx2_hadamard_blocks<4>(x, k, out);
    case 64: return avx2_hadamard_blocks<8>(x, k, out);
    default: break;
  }
  if (block < 8) return hadamard_row_ref(x, k, block, out);
  avx2_hadamard_blocks<8>(x, k, out);  // stages up to h = 32, then the rest through memory:
  int64_t h = 64;                        // two stages (h, 2h) per pass while two are left
  for (; 2 * h < block; h *= 4)
    for (int64_t g = 0; g < k; g += 4 * h)
      for (int64_t j = g; j < g + h; j += 8) {
        const __m256 a = _mm256_loadu_ps(out + j), b = _mm256_loadu_ps(out + j + h);
        const __m256 c = _mm256_loadu_ps(out + j + 2 * h), d = _mm256_loadu_ps(out + j + 3 * h);
        const __m256 a1 = _mm256_add_ps(a, b), b1 = _mm256_sub_ps(a, b);
        const __m256 c1 = _mm256_add_ps(c, d), d1 = _mm256_sub_ps(c, d);
        _mm256_storeu_ps(out + j, _mm256_add_ps(a1, c1));
        _mm256_storeu_ps(out + j + h, _mm256_add_ps(b1, d1));
        _mm256_storeu_ps(out + j + 2 * h, _mm256_sub_ps(a1, c1));
        _mm256_storeu_ps(out + j + 3 * h, _mm256_sub_ps(b1, d1));
      }
  if (h < block)
    for (int64_t g = 0; g < k; g += 2 * h)
      for (int64_t j = g; j < g + h; j += 8) {
        const __m256 a = _mm256_loadu_ps(out + j), b = _mm256_loadu_ps(out + j + h);
        _mm256_storeu_ps(out + j, _mm256_add_ps(a, b));
        _mm256_storeu_ps(out + j + h, _mm256_sub_ps(a, b));
      }
}

// ---- exact GELU in place (cpp/gelu.h): both erf branches on all 8 lanes (the exp one only
// when some lane needs it), blended by |a| > kSplit; the reference's operations in its order
static inline __m256 avx2_exp_neg(__m256 r) {
  using namespace gelu_coef;
  r = _mm256_max_ps(r, _mm256_set1_ps(kExpMin));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(r, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), r);
  f = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), f);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(e0), f, _mm256_set1_ps(e1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(e2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(e3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(e4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(e5));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(f, f), _mm256_add_ps(f, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline __m256 avx2_gelu8(__m256 x) {
  using namespace gelu_coef;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 a = _mm256_mul_ps(x, _mm256_set1_ps(kRsqrt2));
  const __m256 t = _mm256_andnot_ps(sign, a), s = _mm256_mul_ps(a, a);
  __m256 r = _mm256_fmadd_ps(_mm256_set1_ps(s0), s, _mm256_set1_ps(s1));
  r = _mm256_fmadd_ps(r, s, _mm256_set1_ps(s2));
  r = _mm256_fmadd_ps(r, s, _mm256_set1_ps(s3));
  r = _mm256_fmadd_ps(r, s, _mm256_set1_ps(s4));
  r = _mm256_fmadd_ps(r, s, _mm256_set1_ps(s5));
  r = _mm256_fmadd_ps(r, a, a);
  const __m256 big = _mm256_cmp_ps(t, _mm256_set1_ps(kSplit), _CMP_GT_OQ);
  if (_mm256_movemask_ps(big)) {
    __m256 q = _mm256_fmadd_ps(_mm256_set1_ps(b0), t, _mm256_set1_ps(b1));
    const __m256 u = _mm256_fmadd_ps(_mm256_set1_ps(b2), t, _mm256_set1_ps(b3));
    q = _mm256_fmadd_ps(q, s, u);
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(b4));
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(b5));
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(b6));
    q = _mm256_fmsub_ps(q, t, t);  // fma(q, t, -t)
    q = _mm256_sub_ps(_mm256_set1_ps(1.0f), avx2_exp_neg(q));
    q = _mm256_or_ps(_mm256_andnot_ps(sign, q), _mm256_and_ps(sign, a));  // copysign(q, a)
    r = _mm256_blendv_ps(r, q, big);
  }
  const __m256 h = _mm256_mul_ps(x, _mm256_set1_ps(kHalf));
  return _mm256_fmadd_ps(h, r, h);
}

void avx2_gelu_row(float* x, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, avx2_gelu8(_mm256_loadu_ps(x + j)));
  if (j < n) gelu_row_ref(x + j, n - j);  // the same bits
}

// ---- a row's largest finite |x| (|x * mul| when mul is set) as its bit pattern (actpack.h
// finite_abs_bits), 8 at a time: non-negative int32 patterns, NaN and inf (>= inf) dropped.
int32_t avx2_row_absmax(const float* x, const float* mul, int64_t n) {
  const __m256i absmask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
  __m256i m = _mm256_setzero_si256();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 xv = _mm256_loadu_ps(x + j);
    if (mul) xv = _mm256_mul_ps(xv, _mm256_loadu_ps(mul + j));
    const __m256i v = _mm256_and_si256(_mm256_castps_si256(xv), absmask);
    m = _mm256_max_epi32(m, _mm256_and_si256(v, _mm256_cmpgt_epi32(inf, v)));
  }
  alignas(32) int32_t l[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(l), m);
  int32_t r = *std::max_element(l, l + 8);
  for (; j < n; ++j) {  // (actpack.h's inline finite_abs_bits is not used here: no shared inline code)
    const float v = mul ? x[j] * mul[j] : x[j];
    int32_t u;
    std::memcpy(&u, &v, sizeof u);
    u &= 0x7fffffff;
    if (u < 0x7f800000) r = std::max(r, u);
  }
  return r;
}

// ---- column merge (kernels.h ColumnMerge): two tiers (the usual case) as two 8-lane
// permutes and a blend per 8 outputs, the lanes of each from a table of the ranks of an
// 8-bit mask's set bits; more tiers, or a tier not ascending: the plain gather through inv --
struct ExpandLanes {
  alignas(32) int32_t rank[256][8];  // rank[m][l]: set bits of m below bit l
  ExpandLanes() {
    for (int m = 0; m < 256; ++m)
      for (int l = 0; l < 8; ++l) rank[m][l] = __builtin_popcount(unsigned(m) & ((1u << l) - 1u));
  }
};

void avx2_merge_columns(const float* src, int64_t lds, int64_t rows, const ColumnMerge& cm, float* out, int64_t ldo) {
  static const ExpandLanes lut;
  const int64_t n = cm.n;
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * lds;
    float* o = out + r * ldo;
    int64_t c = 0;
    if (cm.masks && cm.ngroups == 2) {
      int64_t p0 = cm.start[0], p1 = cm.start[1];
      for (; c + 8 <= n; c += 8) {
        const unsigned m0 = (cm.masks[c / 16 * 2] >> (c % 16)) & 0xFFu, m1 = (~m0) & 0xFFu;
        const __m256 v0 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(s + p0), _mm256_load_si256(reinterpret_cast<const __m256i*>(lut.rank[m0])));
        const __m256 v1 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(s + p1), _mm256_load_si256(reinterpret_cast<const __m256i*>(lut.rank[m1])));
        const __m256 sel = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int(m0)), bit), bit));
        _mm256_storeu_ps(o + c, _mm256_blendv_ps(v1, v0, sel));
        p0 += __builtin_popcount(m0), p1 += __builtin_popcount(m1);
      }
    }
    for (; c < n; ++c) o[c] = s[cm.inv[c]];  // the rest as ref_merge_columns (vgatherqps: slower on Zen 4)
  }
}

}  // namespace

const KernelTable& kernels_avx2() {
  // Measured (bench/cpp soniq_bench, one core of an AMD EPYC Zen 4 on the AVX2 path; the avx2 rows of
  // bench/results/bench_cpp_amd-epyc-avx512.json are a later, noisier run): bit-serial
  // wins only for 1x1 bits against the layout GEMM (M16/M64: 324/239 vs 266/193 GOP/s; 1x2:
  // 137/142 vs 246/198), and up to 1x2 against the layout GEMV (1x1: 326 vs 162; 1x2: 174 vs
  // 157; 2x2: 83 vs 134).
  static const KernelTable t = [] {
    KernelTable k;
    k.name = "avx2";
    k.bitserial = avx2_bitserial;
    k.pack_planes = avx2_pack_planes;
    k.unpack_planes = avx2_unpack_planes;
    k.bitserial_max_pairs = 1;
    k.bitserial_max_pairs_gemv = 2;
    k.keep_planes_max_pairs = 1;
    k.quant_pack = avx2_quant_pack;
    k.layout_gemv = avx2::layout_gemv;
    k.layout_gemm = avx2::layout_gemm;
    k.layout_gemv_rows = 4;
    k.quant_bytes = avx2_quant_bytes;
    k.row_absmax = avx2_row_absmax;
    k.hadamard_row = avx2_hadamard_row;
    k.gelu_row = avx2_gelu_row;
    k.trellis_step = trellis_step_avx2;
    k.merge_columns = avx2_merge_columns;
    k.peak_probe = peak_probe_avx2;
    return k;
  }();
  return t;
}

}  // namespace soniq
