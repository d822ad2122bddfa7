// AVX-512 path (F/BW/VL/DQ/VNNI/VPOPCNTDQ flags). Runs only when cpuid + XCR0 say so.
// The only translation unit built with -mavx512*.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <cstdlib>
#include <memory>
#include <new>

#include "gelu.h"
#include "trellis.h"
#include "hadamard.h"
#include "kernels_avx512_layout.h"
#include "bitserial_tiles.inl"
#include "kernels_ref.inl"

// GCC 12 headers: _mm512_reduce_add_* trip a false -Wmaybe-uninitialized
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace soniq {

#include "thread_buffer.inl"

namespace {

// ---- bit-serial: vpopcntq on 8 words at once, 4x4 rows per inner loop (16 zmm accs) ------
template <int RM, int RN>
inline void bs_micro(const uint64_t* A, int pa, int64_t sa, const uint64_t* B, int pb, int64_t sb,
                     int64_t kw, int64_t kw_blk, int64_t* C, int64_t ldc, int shift) {
  int64_t acc[RM][RN] = {};
  const __mmask8 tail = __mmask8((1u << (kw_blk & 7)) - 1u);
  for (int p = 0; p < pa; ++p) {
    for (int q = 0; q < pb; ++q) {
      const uint64_t* a = A + p * sa;
      const uint64_t* b = B + q * sb;
      __m512i s[RM][RN];
      for (int i = 0; i < RM; ++i)
        for (int j = 0; j < RN; ++j) s[i][j] = _mm512_setzero_si512();
      int64_t w = 0;
      auto step = [&](__mmask8 m) {
        __m512i av[RM];
        for (int i = 0; i < RM; ++i) av[i] = _mm512_maskz_loadu_epi64(m, a + i * kw + w);
        for (int j = 0; j < RN; ++j) {
          const __m512i bv = _mm512_maskz_loadu_epi64(m, b + j * kw + w);
          for (int i = 0; i < RM; ++i)
            s[i][j] = _mm512_add_epi64(s[i][j], _mm512_popcnt_epi64(_mm512_and_si512(av[i], bv)));
        }
      };
      for (; w + 8 <= kw_blk; w += 8) step(__mmask8(0xFF));
      if (w < kw_blk) step(tail);
      for (int i = 0; i < RM; ++i)
        for (int j = 0; j < RN; ++j) acc[i][j] += _mm512_reduce_add_epi64(s[i][j]) << (p + q);
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

// ---- bit-serial for 4+ rows: B words interleaved, 8 columns per vector ---------------------
// The kernel above sums 8 K words of one output per vector, so every output ends in a
// horizontal reduction (~7 ops): at K = 384 (6 words) that is most of its work. Here a vector
// holds one K word of 8 columns, so a lane is one output's accumulator: per word RM
// broadcasts of A, then per 8 outputs one and + popcount + add, and no reduction. A block's
// B (at most kBsiBlockWords words of each column, every plane) is interleaved first into a
// per-thread buffer, Bi[q][w][j] for j < N rounded up to 8 (zero words past N): its cost is
// amortized over the rows.
constexpr int64_t kBsiBlockWords = 128;  // 64 KiB per plane at 64 columns: the block stays in L2
constexpr int64_t kBsiMinRows = 4;       // fewer rows: the interleave would not pay (GEMV)

// RM rows x NV vectors (8 columns each) of C (int64, ldc) += the block's product over wb words
// << shift;
// nc: live columns of the NV vectors (masked stores).
template <int RM, int NV>
inline void bsi_micro(const uint64_t* A, int pa, int64_t sa, int64_t kw, const uint64_t* Bi, int pb, int64_t qs,
                      int64_t npad, int64_t wb, int64_t* C, int64_t ldc, int64_t nc, int shift) {
  for (int p = 0; p < pa; ++p) {
    for (int q = 0; q < pb; ++q) {
      __m512i s[RM][NV];
      for (int i = 0; i < RM; ++i)
        for (int v = 0; v < NV; ++v) s[i][v] = _mm512_setzero_si512();
      const uint64_t* a = A + p * sa;
      const uint64_t* b = Bi + q * qs;
      for (int64_t w = 0; w < wb; ++w) {
        __m512i av[RM];
        for (int i = 0; i < RM; ++i) av[i] = _mm512_set1_epi64(int64_t(a[i * kw + w]));
        for (int v = 0; v < NV; ++v) {
          const __m512i bv = _mm512_load_si512(b + w * npad + v * 8);
          for (int i = 0; i < RM; ++i)
            s[i][v] = _mm512_add_epi64(s[i][v], _mm512_popcnt_epi64(_mm512_and_si512(av[i], bv)));
        }
      }
      for (int v = 0; v < NV; ++v) {
        const int64_t live = std::min<int64_t>(8, nc - v * 8);
        const __mmask8 m = __mmask8((1u << live) - 1u);
        for (int i = 0; i < RM; ++i) {
          int64_t* c = C + i * ldc + v * 8;
          const __m512i sum = _mm512_add_epi64(_mm512_maskz_loadu_epi64(m, c), _mm512_slli_epi64(s[i][v], unsigned(p + q + shift)));
          _mm512_mask_storeu_epi64(c, m, sum);
        }
      }
    }
  }
}

// RM rows, every column of the block: vectors 4 at a time, then the 1-3 left.
template <int RM>
inline void bsi_rows(const uint64_t* A, int pa, int64_t sa, int64_t kw, const uint64_t* Bi, int pb, int64_t qs,
                     int64_t npad, int64_t wb, int64_t N, int64_t* C, int64_t ldc, int shift) {
  int64_t v = 0;
  const int64_t nv = npad / 8;
  for (; v + 4 <= nv; v += 4) bsi_micro<RM, 4>(A, pa, sa, kw, Bi + v * 8, pb, qs, npad, wb, C + v * 8, ldc, N - v * 8, shift);
  switch (nv - v) {
    case 3: bsi_micro<RM, 3>(A, pa, sa, kw, Bi + v * 8, pb, qs, npad, wb, C + v * 8, ldc, N - v * 8, shift); break;
    case 2: bsi_micro<RM, 2>(A, pa, sa, kw, Bi + v * 8, pb, qs, npad, wb, C + v * 8, ldc, N - v * 8, shift); break;
    case 1: bsi_micro<RM, 1>(A, pa, sa, kw, Bi + v * 8, pb, qs, npad, wb, C + v * 8, ldc, N - v * 8, shift); break;
    default: break;
  }
}

void bitserial_interleaved(const uint64_t* A, int pa, int64_t sa, int64_t M, const uint64_t* B, int pb, int64_t sb,
                           int64_t N, int64_t kw, int64_t* C, int64_t ldc, int shift) {
  const int64_t npad = (N + 7) / 8 * 8;
  for (int64_t w0 = 0; w0 < kw; w0 += kBsiBlockWords) {
    const int64_t wb = std::min(kBsiBlockWords, kw - w0), qs = wb * npad;
    uint64_t* Bi = reinterpret_cast<uint64_t*>(thread_buffer<0>(pb * qs * 8));  // 64-byte aligned
    for (int q = 0; q < pb; ++q)
      for (int64_t w = 0; w < wb; ++w) {
        uint64_t* d = Bi + q * qs + w * npad;
        const uint64_t* s = B + q * sb + w0 + w;
        for (int64_t j = 0; j < N; ++j) d[j] = s[j * kw];
        for (int64_t j = N; j < npad; ++j) d[j] = 0;
      }
    const uint64_t* a = A + w0;
    int64_t i = 0;
    for (; i + 4 <= M; i += 4) bsi_rows<4>(a + i * kw, pa, sa, kw, Bi, pb, qs, npad, wb, N, C + i * ldc, ldc, shift);
    switch (M - i) {
      case 3: bsi_rows<3>(a + i * kw, pa, sa, kw, Bi, pb, qs, npad, wb, N, C + i * ldc, ldc, shift); break;
      case 2: bsi_rows<2>(a + i * kw, pa, sa, kw, Bi, pb, qs, npad, wb, N, C + i * ldc, ldc, shift); break;
      case 1: bsi_rows<1>(a + i * kw, pa, sa, kw, Bi, pb, qs, npad, wb, N, C + i * ldc, ldc, shift); break;
      default: break;
    }
  }
}

void avx512_bitserial(const uint64_t* A, int pa, int64_t sa, int64_t M, const uint64_t* B, int pb,
                    int64_t sb, int64_t N, int64_t kw, int64_t* C, int64_t ldc, int shift) {
  if (M >= kBsiMinRows) return bitserial_interleaved(A, pa, sa, M, B, pb, sb, N, kw, C, ldc, shift);
  bitserial_tiles<BsMicro, 4>(A, pa, sa, M, B, pb, sb, N, kw, C, ldc, shift);
}

// ---- codes -> planes: vptestmb gives a whole 64-bit plane word -----------------------------
void avx512_pack_planes(const uint8_t* codes, int64_t rows, int64_t klen, int64_t ld, int bits, int64_t kw,
                        uint64_t* out) {
  const int64_t plane = rows * kw;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = codes + r * ld;
    for (int64_t w = 0; w < kw; ++w) {
      const int64_t k0 = w * 64, n = std::max<int64_t>(0, std::min<int64_t>(64, klen - k0));
      const __mmask64 valid = n == 64 ? ~__mmask64(0) : ((__mmask64(1) << n) - 1);
      const __m512i x = _mm512_maskz_loadu_epi8(valid, row + std::min(k0, klen));
      for (int p = 0; p < bits; ++p)
        out[p * plane + r * kw + w] = uint64_t(_mm512_test_epi8_mask(x, _mm512_set1_epi8(char(1 << p))));
    }
  }
}

// ---- planes -> bytes: a plane word is a byte mask ------------------------------------------
inline __m512i expand64(const uint64_t* row, int64_t plane_stride, int p0, int p1, int64_t w) {
  __m512i code = _mm512_setzero_si512();
  for (int p = p0; p < p1; ++p)
    code = _mm512_or_si512(code, _mm512_maskz_mov_epi8(__mmask64(row[p * plane_stride + w]),
                                                       _mm512_set1_epi8(char(1 << (p - p0)))));
  return code;
}

void avx512_unpack_planes(const uint64_t* planes, int bits, int64_t plane_stride, int64_t rows, int64_t kw,
                          uint8_t* out, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t w = 0; w < kw; ++w)
      _mm512_storeu_si512(out + r * ldo + w * 64, expand64(planes + r * kw, plane_stride, 0, bits, w));
}

// ---- activations -> codes: 64 floats of a word -> 64 byte codes in one zmm -----------------
// quantize.cpp clamps t = x * inv (alpha 2: (t + 1) / 2) to [lo - 1, hi + 1], rounds half to
// even by a magic constant and clamps to [lo, hi]. Rounding is monotone and keeps integers, so
// clamping to the integer bounds [lo, hi] first and rounding with vcvtps2dq's embedded
// round-to-nearest-even gives the same integers (tests/native/round_order_check.cpp checks
// every float32 t and encoding). NaN: max/min return the bound, so code 0; the caller
// reports it from nanm.
struct WordCodes {
  const bool a1;
  const __m512 vinv, one, half, clo, chi;
  const __m512i off;
  WordCodes(float inv, float lo, float hi, int alpha)
      : a1(alpha == 1), vinv(_mm512_set1_ps(inv)), one(_mm512_set1_ps(1.0f)), half(_mm512_set1_ps(0.5f)),
        clo(_mm512_set1_ps(a1 ? lo : 0.0f)), chi(_mm512_set1_ps(a1 ? hi : 1.0f)),
        off(_mm512_set1_epi32(a1 ? int(lo) : 0)) {}

  // codes of xs[0..63] (times ms[0..63] when Mul: one vmulps of its own, rounded before the
  // quantization's); NaN lanes or-ed into nanm, the codes' sum added to sum (8 int64 lanes)
  template <bool Mul = false>
  __m512i operator()(const float* xs, __mmask16& nanm, __m512i& sum, const float* ms = nullptr) const {
    __m512i r[4];
    for (int i = 0; i < 4; ++i) {
      __m512 x = _mm512_loadu_ps(xs + 16 * i);
      if (Mul) x = _mm512_mul_ps(x, _mm512_loadu_ps(ms + 16 * i));
      nanm |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
      __m512 t = _mm512_mul_ps(x, vinv);
      if (!a1) t = _mm512_mul_ps(_mm512_add_ps(t, one), half);
      t = _mm512_min_ps(_mm512_max_ps(t, clo), chi);
      r[i] = _mm512_sub_epi32(_mm512_cvt_roundps_epi32(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), off);
    }
    // codes are 0..255, so the saturating packs keep them: per 128-bit lane L the bytes of
    // r0..r3's dwords 4L..4L+3, put back in order by one dword permute (4 shuffles where four
    // vpmovdb and three inserts took 11: a 4096 x 384 x 1536 PackedLinear 0.88-0.92x the time
    // on one thread, Intel Xeon)
    const __m512i b = _mm512_packus_epi16(_mm512_packs_epi32(r[0], r[1]), _mm512_packs_epi32(r[2], r[3]));
    const __m512i v = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), b);
    sum = _mm512_add_epi64(sum, _mm512_sad_epu8(v, _mm512_setzero_si512()));  // int64: no overflow
    return v;
  }
};

// Fused activation quantize + pack: one vptestmb per bit plane gives that plane's word.
int64_t avx512_quant_pack(const float* x_, const int64_t* idx, int64_t klen, int64_t kw, float inv, float lo,
                          float hi, int alpha, int bits, uint64_t* out, int64_t plane_stride, bool* nan) {
  const WordCodes codes(inv, lo, hi, alpha);
  __m512i sum = _mm512_setzero_si512();
  __mmask16 nanm = 0;
  alignas(64) float tmp[64];
  for (int64_t w = 0; w < kw; ++w) {
    const __m512i v = codes(word_floats(x_, idx, klen, w, tmp), nanm, sum);
    for (int p = 0; p < bits; ++p)
      out[p * plane_stride + w] = _mm512_test_epi8_mask(v, _mm512_set1_epi8(char(1 << p)));
  }
  if (nanm) *nan = true;
  return _mm512_reduce_add_epi64(sum);
}

// Activations straight to the layout kernels' A bytes (packed layers' fused path): the codes
// of avx512_quant_pack, without planes.
// mul (smoothing factors): whole words read in place are multiplied in registers; gathered
// or partial ones get their products here (word_floats), one float32 multiply each.
int64_t avx512_quant_bytes(const float* x_, const float* mul, const int64_t* idx, int64_t klen, int64_t kw,
                           float inv, float lo, float hi, int alpha, uint8_t* out, bool* nan) {
  const WordCodes codes(inv, lo, hi, alpha);
  __m512i sum = _mm512_setzero_si512();
  __mmask16 nanm = 0;
  alignas(64) float tmp[64];
  if (!mul) {
    for (int64_t w = 0; w < kw; ++w)
      _mm512_storeu_si512(out + w * 64, codes(word_floats(x_, idx, klen, w, tmp), nanm, sum));
  } else {
    for (int64_t w = 0; w < kw; ++w) {
      const int64_t j0 = w * 64;
      const __m512i v = !idx && klen - j0 >= 64 ? codes.operator()<true>(x_ + j0, nanm, sum, mul + j0)
                                                : codes(word_floats(x_, idx, klen, w, tmp, mul), nanm, sum);
      _mm512_storeu_si512(out + j0, v);
    }
  }
  if (nanm) *nan = true;
  return _mm512_reduce_add_epi64(sum);
}

// ---- a row's largest finite |x| (|x * mul| when mul is set) as its bit pattern (actpack.h
// finite_abs_bits), 16 at a time. Masked-off lanes load 0 (x and mul): |0| never wins.
int32_t avx512_row_absmax(const float* x, const float* mul, int64_t n) {
  const __m512i absmask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
  __m512i m = _mm512_setzero_si512();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 live = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1u);
    __m512 xv = _mm512_maskz_loadu_ps(live, x + j);
    if (mul) xv = _mm512_mul_ps(xv, _mm512_maskz_loadu_ps(live, mul + j));
    const __m512i v = _mm512_and_si512(_mm512_castps_si512(xv), absmask);
    m = _mm512_mask_max_epi32(m, _mm512_cmplt_epi32_mask(v, inf), m, v);
  }
  return _mm512_reduce_max_epi32(m);
}

// ---- block Hadamard rotation of a row (cpp/hadamard.h), blocks of 16+: stages h < 16 within
// each vector (partner lane i ^ h by a permute; the lower lane keeps a + b, the upper one
// takes a - b), then h >= 16 across vectors: blocks of up to 128 columns in registers (one
// load and one store per vector), larger ones stage by stage through `out`. Each element gets
// the reference's operations in its order, so the bits are the reference's. Smaller blocks:
// the portable loop.
static inline __m512 avx512_hadamard16(__m512 v) {
  __m512 p = _mm512_permute_ps(v, 0xB1);  // h = 1
  v = _mm512_mask_sub_ps(_mm512_add_ps(v, p), 0xAAAA, p, v);
  p = _mm512_permute_ps(v, 0x4E);  // h = 2
  v = _mm512_mask_sub_ps(_mm512_add_ps(v, p), 0xCCCC, p, v);
  p = _mm512_shuffle_f32x4(v, v, 0xB1);  // h = 4: 128-bit lanes 1 0 3 2
  v = _mm512_mask_sub_ps(_mm512_add_ps(v, p), 0xF0F0, p, v);
  p = _mm512_shuffle_f32x4(v, v, 0x4E);  // h = 8: 2 3 0 1
  return _mm512_mask_sub_ps(_mm512_add_ps(v, p), 0xFF00, p, v);
}

template <int NV>  // one block of NV * 16 columns, in registers
static void avx512_hadamard_blocks(const float* x, int64_t k, float* out) {
  for (int64_t b = 0; b < k; b += NV * 16) {
    __m512 v[NV];
    for (int i = 0; i < NV; ++i) v[i] = avx512_hadamard16(_mm512_loadu_ps(x + b + 16 * i));
    // fully unrolled so that v[] stays in registers (rolled, GCC keeps it on the stack: blocks
    // of 128 took 2x the time of 32)
#pragma GCC unroll 8
    for (int h = 1; h < NV; h *= 2)  // h vectors = 16 h columns
#pragma GCC unroll 8
      for (int g = 0; g < NV; g += 2 * h)
#pragma GCC unroll 8
        for (int i = g; i < g + h; ++i) {
          const __m512 a = v[i], c = v[i + h];
          v[i] = _mm512_add_ps(a, c);
          v[i + h] = _mm512_sub_ps(a, c);
        }
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(out + b + 16 * i, v[i]);
  }
}

void avx512_hadamard_row(const float* x, int64_t k, int block, float* out) {
  switch (block) {
    case 16: return avx512_hadamard_blocks<1>(x, k, out);
    case 32: return avx512_hadamard_blocks<2>(x, k, out);
    case 64: return avx512_hadamard_blocks<4>(x, k, out);
    case 128: return avx512_hadamard_blocks<8>(x, k, out);
    default: break;
  }
  if (block < 16) return hadamard_row_ref(x, k, block, out);
  avx512_hadamard_blocks<8>(x, k, out);  // stages up to h = 64, then the rest through memory:
  int64_t h = 128;                        // two stages (h, 2h) per pass while two are left
  for (; 2 * h < block; h *= 4)
    for (int64_t g = 0; g < k; g += 4 * h)
      for (int64_t j = g; j < g + h; j += 16) {
        const __m512 a = _mm512_loadu_ps(out + j), b = _mm512_loadu_ps(out + j + h);
        const __m512 c = _mm512_loadu_ps(out + j + 2 * h), d = _mm512_loadu_ps(out + j + 3 * h);
        const __m512 a1 = _mm512_add_ps(a, b), b1 = _mm512_sub_ps(a, b);
        const __m512 c1 = _mm512_add_ps(c, d), d1 = _mm512_sub_ps(c, d);
        _mm512_storeu_ps(out + j, _mm512_add_ps(a1, c1));
        _mm512_storeu_ps(out + j + h, _mm512_add_ps(b1, d1));
        _mm512_storeu_ps(out + j + 2 * h, _mm512_sub_ps(a1, c1));
        _mm512_storeu_ps(out + j + 3 * h, _mm512_sub_ps(b1, d1));
      }
  if (h < block)
    for (int64_t g = 0; g < k; g += 2 * h)
      for (int64_t j = g; j < g + h; j += 16) {
        const __m512 a = _mm512_loadu_ps(out + j), b = _mm512_loadu_ps(out + j + h);
        _mm512_storeu_ps(out + j, _mm512_add_ps(a, b));
        _mm512_storeu_ps(out + j + h, _mm512_sub_ps(a, b));
      }
}

// ---- exact GELU in place (cpp/gelu.h): both erf branches on all 16 lanes (the exp one only
// when some lane needs it), blended by |a| > kSplit; the reference's operations in its order
static inline __m512 avx512_exp_neg(__m512 r) {
  using namespace gelu_coef;
  r = _mm512_max_ps(r, _mm512_set1_ps(kExpMin));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(r, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), r);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), f);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(e0), f, _mm512_set1_ps(e1));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(e2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(e3));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(e4));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(e5));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);  // p * 2^n, rounded once: the reference's multiply by 2^n
}

static inline __m512 avx512_gelu16(__m512 x) {
  using namespace gelu_coef;
  const __m512 a = _mm512_mul_ps(x, _mm512_set1_ps(kRsqrt2));
  const __m512 t = _mm512_abs_ps(a), s = _mm512_mul_ps(a, a);
  __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(s0), s, _mm512_set1_ps(s1));
  r = _mm512_fmadd_ps(r, s, _mm512_set1_ps(s2));
  r = _mm512_fmadd_ps(r, s, _mm512_set1_ps(s3));
  r = _mm512_fmadd_ps(r, s, _mm512_set1_ps(s4));
  r = _mm512_fmadd_ps(r, s, _mm512_set1_ps(s5));
  r = _mm512_fmadd_ps(r, a, a);
  const __mmask16 big = _mm512_cmp_ps_mask(t, _mm512_set1_ps(kSplit), _CMP_GT_OQ);
  if (big) {
    __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(b0), t, _mm512_set1_ps(b1));
    const __m512 u = _mm512_fmadd_ps(_mm512_set1_ps(b2), t, _mm512_set1_ps(b3));
    q = _mm512_fmadd_ps(q, s, u);
    q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(b4));
    q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(b5));
    q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(b6));
    q = _mm512_fmsub_ps(q, t, t);  // fma(q, t, -t)
    q = _mm512_sub_ps(_mm512_set1_ps(1.0f), avx512_exp_neg(q));
    // copysign(q, a): a's sign bit, q's other bits
    q = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_set1_epi32(0x7FFFFFFF), _mm512_castps_si512(q),
                                                      _mm512_castps_si512(a), 0xCA));
    r = _mm512_mask_mov_ps(r, big, q);
  }
  const __m512 h = _mm512_mul_ps(x, _mm512_set1_ps(kHalf));
  return _mm512_fmadd_ps(h, r, h);
}

void avx512_gelu_row(float* x, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) _mm512_storeu_ps(x + j, avx512_gelu16(_mm512_loadu_ps(x + j)));
  if (j < n) {
    const __mmask16 m = __mmask16((1u << (n - j)) - 1u);
    _mm512_mask_storeu_ps(x + j, m, avx512_gelu16(_mm512_maskz_loadu_ps(m, x + j)));
  }
}

// ---- float epilogue: int64 -> double (vcvtqq2pd), the scalar driver's multiplications in
// its order, double -> float, to the original column order: plain loads/stores where 8
// columns are consecutive there (weights of one tier usually are), else gather / scalar
// stores (vscatterqps is microcoded and slow on Zen 4) ---------------------------------------
void avx512_epilogue_f32(const int64_t* acc, int64_t n, double segscale, bool has_ar, double ar,
                         const float* b_row, const int64_t* perm, float* out_row, const float* bias) {
  const __m512d zero = _mm512_setzero_pd(), vs = _mm512_set1_pd(segscale), va = _mm512_set1_pd(ar);
  const __m512i iota = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t j = 0; j < n; j += 8) {
    const __mmask8 m = n - j >= 8 ? __mmask8(0xFF) : __mmask8((1u << (n - j)) - 1u);
    const __m512i idx = _mm512_maskz_loadu_epi64(m, perm + j);
    const int64_t p0 = perm[j];
    const bool run = _mm512_mask_cmpeq_epi64_mask(m, idx, _mm512_add_epi64(_mm512_set1_epi64(p0), iota)) == m;
    __m512d v = _mm512_add_pd(zero, _mm512_mul_pd(_mm512_cvtepi64_pd(_mm512_maskz_loadu_epi64(m, acc + j)), vs));
    if (has_ar) v = _mm512_mul_pd(v, va);
    if (b_row) {
      const __m256 br = run ? _mm256_maskz_loadu_ps(m, b_row + p0) : _mm512_mask_i64gather_ps(_mm256_setzero_ps(), m, idx, b_row, 4);
      v = _mm512_mul_pd(v, _mm512_cvtps_pd(br));
    }
    __m256 o = _mm512_cvtpd_ps(v);
    if (bias)  // float32 add after the rounding, as torch's out + bias
      o = _mm256_add_ps(o, run ? _mm256_maskz_loadu_ps(m, bias + p0)
                               : _mm512_mask_i64gather_ps(_mm256_setzero_ps(), m, idx, bias, 4));
    if (run) {
      _mm256_mask_storeu_ps(out_row + p0, m, o);
    } else {
      alignas(32) float tmp[8];
      alignas(64) int64_t at[8];
      _mm256_store_ps(tmp, o);
      _mm512_store_si512(at, idx);
      for (int64_t q = 0; q < 8 && j + q < n; ++q) out_row[at[q]] = tmp[q];
    }
  }
}

// ---- column merge (kernels.h ColumnMerge): per 16 output columns one expand of each
// group's next floats into its lanes, one store ----------------------------------------------
// a load the compiler may not fold into vexpandps: its memory form is microcoded on Zen 4
// (a 128x1536 merge 3x slower)
inline __m512 loadu_reg(const float* p) {
  __m512 v = _mm512_loadu_ps(p);
  asm("" : "+v"(v));
  return v;
}

void avx512_merge_columns(const float* src, int64_t lds, int64_t rows, const ColumnMerge& cm, float* out,
                          int64_t ldo) {
  const int64_t n = cm.n, G = cm.ngroups;
  if (!cm.masks || G > 16) return ref_merge_columns(src, lds, rows, cm, out, ldo);  // rare
  if (G == 2 && cm.lanes2) {  // two tiers, the usual case: one two-source permute per 16
    for (int64_t r = 0; r < rows; ++r) {
      const float* s = src + r * lds;
      int64_t p0 = cm.start[0], p1 = cm.start[1];
      for (int64_t c = 0, q = 0; c < n; c += 16, ++q) {
        const __mmask16 m0 = cm.masks[2 * q], m1 = cm.masks[2 * q + 1];
        const __m512i lanes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cm.lanes2 + c)));
        const __m512 v = _mm512_permutex2var_ps(_mm512_loadu_ps(s + p0), lanes, _mm512_loadu_ps(s + p1));
        p0 += __builtin_popcount(m0), p1 += __builtin_popcount(m1);
        _mm512_mask_storeu_ps(out + r * ldo + c, __mmask16(m0 | m1), v);
      }
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * lds;
    int64_t pos[16];
    for (int64_t g = 0; g < G; ++g) pos[g] = cm.start[g];
    for (int64_t c = 0, q = 0; c < n; c += 16, ++q) {
      const uint16_t* mk = cm.masks + q * G;
      __m512 v = _mm512_setzero_ps();
      for (int64_t g = 0; g < G; ++g) {
        const __mmask16 m = mk[g];
        if (!m) continue;
        v = _mm512_mask_expand_ps(v, m, loadu_reg(s + pos[g]));  // 16 readable past each row
        pos[g] += __builtin_popcount(m);
      }
      const __mmask16 live = n - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - c)) - 1u);
      _mm512_mask_storeu_ps(out + r * ldo + c, live, v);
    }
  }
}

}  // namespace

const KernelTable& kernels_avx512() {
  // byte products run on the weight execution layout only (no plane kernel, no table path)
  static const KernelTable t = [] {
    KernelTable k;
    k.name = "avx512";
    k.bitserial = avx512_bitserial;
    k.pack_planes = avx512_pack_planes;
    k.unpack_planes = avx512_unpack_planes;
    k.bitserial_max_pairs = 3;  // 1x3 too since the interleaved kernel (bench/cpp, DESIGN_NOTES)
    k.bitserial_max_pairs_gemv = 4;
    k.keep_planes_max_pairs = 1;
    k.quant_pack = avx512_quant_pack;
    k.epilogue_f32 = avx512_epilogue_f32;
    k.layout_gemv = avx512::layout_gemv;
    k.layout_gemm = avx512::layout_gemm;
    k.layout_gemv_rows = 4;
    k.quant_bytes = avx512_quant_bytes;
    k.row_absmax = avx512_row_absmax;
    k.hadamard_row = avx512_hadamard_row;
    k.gelu_row = avx512_gelu_row;
    k.trellis_step = trellis_step_avx512;
    k.merge_columns = avx512_merge_columns;
    k.peak_probe = peak_probe_avx512;
    return k;
  }();
  return t;
}

}  // namespace soniq
