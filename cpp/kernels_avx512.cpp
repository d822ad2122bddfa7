// AVX-512 path (F/BW/VL/DQ/VNNI/VPOPCNTDQ flags). Runs only when cpuid + XCR0 say so.
// The only translation unit built with -mavx512*.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "kernels_ref.inl"

// GCC 12 headers: _mm512_reduce_add_* trip a false -Wmaybe-uninitialized
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace soniq {
namespace {

// ---- bit-serial: vpopcntq on 8 words at once, 4x4 rows per inner loop (16 zmm accs) ------
template <int RM, int RN>
inline void bs_micro(const uint64_t* A, int pa, int64_t sa, const uint64_t* B, int pb, int64_t sb,
                     int64_t kw, int64_t kw_blk, int64_t* C, int64_t ldc) {
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
    for (int j = 0; j < RN; ++j) C[i * ldc + j] += acc[i][j];
}

template <int RM>
inline void bs_row_strip(const uint64_t* A, int pa, int64_t sa, const uint64_t* B, int pb, int64_t sb,
                         int64_t N, int64_t kw, int64_t kw_blk, int64_t* C, int64_t ldc) {
  int64_t j = 0;
  for (; j + 4 <= N; j += 4) bs_micro<RM, 4>(A, pa, sa, B + j * kw, pb, sb, kw, kw_blk, C + j, ldc);
  for (; j < N; ++j) bs_micro<RM, 1>(A, pa, sa, B + j * kw, pb, sb, kw, kw_blk, C + j, ldc);
}

void avx512_bitserial(const uint64_t* A, int pa, int64_t sa, int64_t M, const uint64_t* B, int pb,
                      int64_t sb, int64_t N, int64_t kw, int64_t* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, int64_t(0));
  constexpr int64_t kKwBlock = 128;
  for (int64_t w0 = 0; w0 < kw; w0 += kKwBlock) {
    const int64_t wb = std::min(kKwBlock, kw - w0);
    int64_t i = 0;
    for (; i + 4 <= M; i += 4) bs_row_strip<4>(A + i * kw + w0, pa, sa, B + w0, pb, sb, N, kw, wb, C + i * ldc, ldc);
    for (; i < M; ++i) bs_row_strip<1>(A + i * kw + w0, pa, sa, B + w0, pb, sb, N, kw, wb, C + i * ldc, ldc);
  }
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

// ---- bytes x planes with vpdpbusd (u8 A codes x s8 B codes): B codes <= 127 are exact, so
// planes 0..6 and plane 7 are handled separately.
constexpr int kLoPlanes = 7;
constexpr int64_t kBytesKwBlock = 64;

// few rows (5..31): B expanded per 4 columns and reused by every row, 4x4 accumulators
// summed across lanes per K block (cheaper than the VNNI regrouping when few rows share it)
template <int RM>
inline void bp_micro(const uint8_t* A, int64_t lda, const int8_t* wb, int64_t wld, int64_t nbytes,
                     int64_t* C, int64_t ldc, int nj, int shift) {
  __m512i acc[RM][4];
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_si512();
  for (int64_t k = 0; k < nbytes; k += 64) {
    __m512i a[RM];
    for (int i = 0; i < RM; ++i) a[i] = _mm512_loadu_si512(A + i * lda + k);
    for (int j = 0; j < 4; ++j) {
      const __m512i b = _mm512_load_si512(wb + j * wld + k);
      for (int i = 0; i < RM; ++i) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], a[i], b);
    }
  }
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < nj; ++j) C[i * ldc + j] += int64_t(_mm512_reduce_add_epi32(acc[i][j])) << shift;
}

// ---- few A rows (GEMV): no B expansion at all. A plane word of B is a byte mask that
// selects A's codes (vpmovdqu8 {z}); vpdpbusd against ones sums them 4 per int32 lane.
// Per 64 weights of one plane: a mask load, a masked move and a dot product, so a b-bit
// weight row costs b such steps and streams b/8 of an int8 row. One accumulator per
// (row, column, plane) keeps the dot-product chains independent; planes are weighted
// 2^p when reduced. Lane sums stay below 4 * 255 * kGemvKwBlock, far inside int32.
constexpr int64_t kGemvKwBlock = 256;
constexpr int kGemvMaxRows = 4;
constexpr int64_t kGemvAhead = 64;  // words (8 cache lines)

template <int RM, int PB, int RN>
inline void gemv_masked_micro(const uint8_t* A, int64_t lda, const uint64_t* B, int64_t sb, int64_t kw,
                              int64_t wcount, int64_t* C, int64_t ldc, int nj) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc[RM][RN][PB];
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < RN; ++j)
      for (int p = 0; p < PB; ++p) acc[i][j][p] = _mm512_setzero_si512();
  auto step = [&](int64_t w) {
    __m512i a[RM];
    for (int i = 0; i < RM; ++i) a[i] = _mm512_loadu_si512(A + i * lda + w * 64);
    for (int j = 0; j < RN; ++j)
      for (int p = 0; p < PB; ++p) {
        const __mmask64 m = _cvtu64_mask64(B[p * sb + j * kw + w]);
        for (int i = 0; i < RM; ++i)
          acc[i][j][p] = _mm512_dpbusd_epi32(acc[i][j][p], _mm512_maskz_mov_epi8(m, a[i]), ones);
      }
  };
  int64_t w = 0;
  // a cache line (8 words) of every plane row per round, the lines kGemvAhead rounds on prefetched:
  // RN * PB interleaved streams are more than the hardware prefetcher follows well
  for (; w + 8 <= wcount; w += 8) {
    for (int j = 0; j < RN; ++j)
      for (int p = 0; p < PB; ++p) _mm_prefetch(reinterpret_cast<const char*>(B + p * sb + j * kw + w + kGemvAhead), _MM_HINT_T0);
    for (int u = 0; u < 8; ++u) step(w + u);
  }
  for (; w < wcount; ++w) step(w);
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < nj; ++j) {
      int64_t s = 0;
      for (int p = 0; p < PB; ++p) s += int64_t(_mm512_reduce_add_epi32(acc[i][j][p])) << p;
      C[i * ldc + j] += s;
    }
}

template <int RM, int PB>
void gemv_masked_rows(const uint8_t* A, int64_t lda, const uint64_t* B, int64_t sb, int64_t N, int64_t kw,
                      int64_t* C, int64_t ldc) {
  // about 16 accumulators: many columns for few planes, few for many
  constexpr int RN = (16 / (PB * RM)) > 0 ? (16 / (PB * RM)) : 1;
  for (int64_t w0 = 0; w0 < kw; w0 += kGemvKwBlock) {
    const int64_t wcount = std::min(kGemvKwBlock, kw - w0);
    int64_t j = 0;
    for (; j + RN <= N; j += RN)
      gemv_masked_micro<RM, PB, RN>(A + w0 * 64, lda, B + j * kw + w0, sb, kw, wcount, C + j, ldc, RN);
    for (; j < N; ++j)
      gemv_masked_micro<RM, PB, 1>(A + w0 * 64, lda, B + j * kw + w0, sb, kw, wcount, C + j, ldc, 1);
  }
}

template <int RM>
void gemv_masked_pb(const uint8_t* A, int64_t lda, const uint64_t* B, int pb, int64_t sb, int64_t N, int64_t kw,
                    int64_t* C, int64_t ldc) {
  switch (pb) {
    case 1: return gemv_masked_rows<RM, 1>(A, lda, B, sb, N, kw, C, ldc);
    case 2: return gemv_masked_rows<RM, 2>(A, lda, B, sb, N, kw, C, ldc);
    case 3: return gemv_masked_rows<RM, 3>(A, lda, B, sb, N, kw, C, ldc);
    case 4: return gemv_masked_rows<RM, 4>(A, lda, B, sb, N, kw, C, ldc);
    case 5: return gemv_masked_rows<RM, 5>(A, lda, B, sb, N, kw, C, ldc);
    case 6: return gemv_masked_rows<RM, 6>(A, lda, B, sb, N, kw, C, ldc);
    case 7: return gemv_masked_rows<RM, 7>(A, lda, B, sb, N, kw, C, ldc);
    default: return gemv_masked_rows<RM, 8>(A, lda, B, sb, N, kw, C, ldc);
  }
}

void avx512_gemv_masked(const uint8_t* A, int64_t lda, int64_t M, const uint64_t* B, int pb, int64_t sb,
                        int64_t N, int64_t kw, int64_t* C, int64_t ldc) {
  int64_t i = 0;
  for (; i + 2 <= M; i += 2) gemv_masked_pb<2>(A + i * lda, lda, B, pb, sb, N, kw, C + i * ldc, ldc);
  if (i < M) gemv_masked_pb<1>(A + i * lda, lda, B, pb, sb, N, kw, C + i * ldc, ldc);
}

// ---- more A rows (GEMM): B in VNNI order, no horizontal sums. Per chunk of K, B's columns
// are expanded once (codes -> bytes) and regrouped so that one zmm holds 4 consecutive codes
// of 16 columns (one int32 lane per column); a row of A is broadcast 4 codes at a time and
// vpdpbusd accumulates 16 outputs per instruction. 8-bit B codes go in as u - 128 (s8 side).
// Lane sums stay below 4 * 255 * 128 * kVnniKw * 16 < 2^31 within a chunk.
constexpr int64_t kVnniKw = 16;   // words of K per chunk (1024 codes)
constexpr int kVnniCols = 64;     // columns per pass: 4 groups of 16

struct VnniBuffers {
  alignas(64) int8_t tmp[kVnniCols * kVnniKw * 64];
  alignas(64) int8_t lo[kVnniCols * kVnniKw * 64];
};

// columns [0, nc) of B, words [w0, w0 + wc), all pb planes -> out[g][k4][16 columns x 4 codes]
// (codes XOR flip: 0x80 turns 8-bit codes u into the s8 value u - 128)
void expand_vnni(const uint64_t* B, int64_t sb, int64_t nc, int64_t kw, int64_t w0, int64_t wc, int pb,
                 char flip, int8_t* tmp, int8_t* out) {
  const int64_t nb = wc * 64, nk4 = wc * 16;
  const __m512i vflip = _mm512_set1_epi8(flip);
  for (int64_t j = 0; j < kVnniCols; ++j)
    for (int64_t w = 0; w < wc; ++w)
      _mm512_store_si512(tmp + j * nb + w * 64, j < nc ? _mm512_xor_si512(expand64(B + j * kw + w0, sb, 0, pb, w), vflip)
                                                       : _mm512_setzero_si512());
  const __m512i col = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(int(nb)));
  for (int g = 0; g < kVnniCols / 16; ++g)
    for (int64_t k4 = 0; k4 < nk4; ++k4)
      _mm512_store_si512(out + (g * nk4 + k4) * 64, _mm512_i32gather_epi32(col, tmp + g * 16 * nb + k4 * 4, 1));
}

inline __m512i bcast4(const uint8_t* p) {  // vpbroadcastd zmm, m32 (alias-safe load)
  return _mm512_broadcastd_epi32(_mm_loadu_si32(p));
}

// acc[i][g] += A row i (4 codes broadcast) . B group g, for RM rows; then C += acc << shift.
// The accumulators are plain locals: GCC keeps them in registers (an array of __m512i made
// it shuffle and spill them every step).
inline void vnni_store(const __m512i& acc, int64_t* c, int64_t j0, int64_t nc, int shift) {
  for (int h = 0; h < 2; ++h) {  // 8 int64 columns at a time
    const int64_t j = j0 + h * 8;
    if (j >= nc) return;
    const __mmask8 m = nc - j >= 8 ? __mmask8(0xFF) : __mmask8((1u << (nc - j)) - 1u);
    const __m256i part = h ? _mm512_extracti64x4_epi64(acc, 1) : _mm512_castsi512_si256(acc);
    const __m512i v = _mm512_slli_epi64(_mm512_cvtepi32_epi64(part), unsigned(shift));
    _mm512_mask_storeu_epi64(c + j, m, _mm512_add_epi64(_mm512_maskz_loadu_epi64(m, c + j), v));
  }
}

#define SONIQ_VNNI_ROW(i, a0, a1, a2, a3)                              \
  {                                                                    \
    const __m512i a = bcast4(A + (i) * lda + k4 * 4);                  \
    a0 = _mm512_dpbusd_epi32(a0, a, b0);                               \
    a1 = _mm512_dpbusd_epi32(a1, a, b1);                               \
    a2 = _mm512_dpbusd_epi32(a2, a, b2);                               \
    a3 = _mm512_dpbusd_epi32(a3, a, b3);                               \
  }

inline void vnni_micro4(const uint8_t* A, int64_t lda, const int8_t* vb, int64_t nk4, int64_t* C, int64_t ldc,
                        int64_t nc, int shift) {
  __m512i c00 = _mm512_setzero_si512(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00,
          c13 = c00, c20 = c00, c21 = c00, c22 = c00, c23 = c00, c30 = c00, c31 = c00, c32 = c00, c33 = c00;
  for (int64_t k4 = 0; k4 < nk4; ++k4) {
    const __m512i b0 = _mm512_load_si512(vb + k4 * 64), b1 = _mm512_load_si512(vb + (nk4 + k4) * 64),
                  b2 = _mm512_load_si512(vb + (2 * nk4 + k4) * 64), b3 = _mm512_load_si512(vb + (3 * nk4 + k4) * 64);
    SONIQ_VNNI_ROW(0, c00, c01, c02, c03)
    SONIQ_VNNI_ROW(1, c10, c11, c12, c13)
    SONIQ_VNNI_ROW(2, c20, c21, c22, c23)
    SONIQ_VNNI_ROW(3, c30, c31, c32, c33)
  }
  const __m512i rows[4][4] = {{c00, c01, c02, c03}, {c10, c11, c12, c13}, {c20, c21, c22, c23}, {c30, c31, c32, c33}};
  for (int i = 0; i < 4; ++i)
    for (int g = 0; g < 4; ++g) vnni_store(rows[i][g], C + i * ldc, g * 16, nc, shift);
}

inline void vnni_micro1(const uint8_t* A, int64_t lda, const int8_t* vb, int64_t nk4, int64_t* C, int64_t nc,
                        int shift) {
  __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0;
  for (int64_t k4 = 0; k4 < nk4; ++k4) {
    const __m512i b0 = _mm512_load_si512(vb + k4 * 64), b1 = _mm512_load_si512(vb + (nk4 + k4) * 64),
                  b2 = _mm512_load_si512(vb + (2 * nk4 + k4) * 64), b3 = _mm512_load_si512(vb + (3 * nk4 + k4) * 64);
    SONIQ_VNNI_ROW(0, c0, c1, c2, c3)
  }
  vnni_store(c0, C, 0, nc, shift);
  vnni_store(c1, C, 16, nc, shift);
  vnni_store(c2, C, 32, nc, shift);
  vnni_store(c3, C, 48, nc, shift);
}
#undef SONIQ_VNNI_ROW

inline int64_t byte_sum(const uint8_t* p, int64_t n) {  // n: a multiple of 64
  __m512i acc = _mm512_setzero_si512();
  for (int64_t k = 0; k < n; k += 64)
    acc = _mm512_add_epi64(acc, _mm512_sad_epu8(_mm512_loadu_si512(p + k), _mm512_setzero_si512()));
  return _mm512_reduce_add_epi64(acc);
}

// 8-bit B codes u do not fit vpdpbusd's s8 side; u - 128 does: one pass over (u XOR 0x80),
// then sum_k a*u = sum_k a*(u - 128) + 128 * sum_k a (the A row's code sum, exact).
void avx512_gemm_vnni(const uint8_t* A, int64_t lda, int64_t M, const uint64_t* B, int pb, int64_t sb, int64_t N,
                      int64_t kw, int64_t* C, int64_t ldc) {
  thread_local std::unique_ptr<VnniBuffers> buf;
  if (!buf) buf.reset(new VnniBuffers);
  const bool flip = pb == 8;
  for (int64_t j0 = 0; j0 < N; j0 += kVnniCols) {
    const int64_t nc = std::min<int64_t>(kVnniCols, N - j0);
    for (int64_t w0 = 0; w0 < kw; w0 += kVnniKw) {
      const int64_t wc = std::min(kVnniKw, kw - w0), nk4 = wc * 16;
      expand_vnni(B + j0 * kw, sb, nc, kw, w0, wc, pb, flip ? char(0x80) : char(0), buf->tmp, buf->lo);
      const uint8_t* a = A + w0 * 64;
      int64_t i = 0;
      for (; i + 4 <= M; i += 4) vnni_micro4(a + i * lda, lda, buf->lo, nk4, C + i * ldc + j0, ldc, nc, 0);
      for (; i < M; ++i) vnni_micro1(a + i * lda, lda, buf->lo, nk4, C + i * ldc + j0, nc, 0);
      if (flip)
        for (i = 0; i < M; ++i) {
          const int64_t fix = 128 * byte_sum(a + i * lda, wc * 64);
          for (int64_t j = 0; j < nc; ++j) C[i * ldc + j0 + j] += fix;
        }
    }
  }
}

void avx512_bytes_rows(const uint8_t* A, int64_t lda, int64_t M, const uint64_t* B, int pb, int64_t sb,
                         int64_t N, int64_t kw, int64_t* C, int64_t ldc) {
  constexpr int64_t wld = kBytesKwBlock * 64;
  alignas(64) int8_t wlo[4 * wld];
  alignas(64) int8_t whi[4 * wld];
  const int lo_planes = std::min(pb, kLoPlanes);
  for (int64_t w0 = 0; w0 < kw; w0 += kBytesKwBlock) {
    const int64_t wcount = std::min(kBytesKwBlock, kw - w0), nbytes = wcount * 64;
    for (int64_t j0 = 0; j0 < N; j0 += 4) {
      const int nj = int(std::min<int64_t>(4, N - j0));
      for (int j = 0; j < 4; ++j)
        for (int64_t w = 0; w < wcount; ++w) {
          __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
          if (j < nj) {
            const uint64_t* row = B + (j0 + j) * kw + w0;
            lo = expand64(row, sb, 0, lo_planes, w);
            if (pb > kLoPlanes) hi = expand64(row, sb, kLoPlanes, pb, w);
          }
          _mm512_store_si512(wlo + j * wld + w * 64, lo);
          if (pb > kLoPlanes) _mm512_store_si512(whi + j * wld + w * 64, hi);
        }
      const uint8_t* a = A + w0 * 64;
      int64_t i = 0;
      for (; i + 4 <= M; i += 4) {
        bp_micro<4>(a + i * lda, lda, wlo, wld, nbytes, C + i * ldc + j0, ldc, nj, 0);
        if (pb > kLoPlanes) bp_micro<4>(a + i * lda, lda, whi, wld, nbytes, C + i * ldc + j0, ldc, nj, kLoPlanes);
      }
      for (; i < M; ++i) {
        bp_micro<1>(a + i * lda, lda, wlo, wld, nbytes, C + i * ldc + j0, ldc, nj, 0);
        if (pb > kLoPlanes) bp_micro<1>(a + i * lda, lda, whi, wld, nbytes, C + i * ldc + j0, ldc, nj, kLoPlanes);
      }
    }
  }
}

constexpr int64_t kVnniMinRows = 32;  // measured: M=16 0.83x, M=64 1.12x, M=128 2x the per-4-columns kernel

void avx512_bytes_planes(const uint8_t* A, int64_t lda, int64_t M, const uint64_t* B, int pb, int64_t sb,
                         int64_t N, int64_t kw, int64_t* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, int64_t(0));
  if (M <= kGemvMaxRows) return avx512_gemv_masked(A, lda, M, B, pb, sb, N, kw, C, ldc);
  if (M < kVnniMinRows) return avx512_bytes_rows(A, lda, M, B, pb, sb, N, kw, C, ldc);
  avx512_gemm_vnni(A, lda, M, B, pb, sb, N, kw, C, ldc);
}

// ---- fused activation quantize + pack: 64 floats -> 64 byte codes in one zmm, then one
// vptestmb per bit plane gives that plane's word directly --------------------------------
inline __m512 clamp_ps(__m512 v, __m512 lo, __m512 hi) { return _mm512_min_ps(_mm512_max_ps(v, lo), hi); }

int64_t avx512_quant_pack(const float* x_, const int64_t* idx, int64_t klen, int64_t kw, float inv, float lo,
                          float hi, int alpha, int bits, uint64_t* out, int64_t plane_stride, bool* nan) {
  const __m512 vinv = _mm512_set1_ps(inv), M = _mm512_set1_ps(12582912.0f);
  // alpha 1: clamp to [lo-1, hi+1], round, clamp to [lo, hi], minus lo; alpha 2: (t+1)/2,
  // clamp to [-2, 3], round, clamp to [0, 1] (the order of operations of quantize.cpp)
  const bool a1 = alpha == 1;
  const __m512 c1lo = _mm512_set1_ps(a1 ? lo - 1.0f : -2.0f), c1hi = _mm512_set1_ps(a1 ? hi + 1.0f : 3.0f);
  const __m512 c2lo = _mm512_set1_ps(a1 ? lo : 0.0f), c2hi = _mm512_set1_ps(a1 ? hi : 1.0f);
  const __m512 off = _mm512_set1_ps(a1 ? lo : 0.0f), one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
  __mmask16 nanm = 0;
  int64_t sum = 0;
  alignas(64) float tmp[64];
  for (int64_t w = 0; w < kw; ++w) {
    const float* xs = word_floats(x_, idx, klen, w, tmp);
    __m128i b[4];
    for (int i = 0; i < 4; ++i) {
      const __m512 x = _mm512_loadu_ps(xs + 16 * i);
      nanm |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
      __m512 t = _mm512_mul_ps(x, vinv);
      if (!a1) t = _mm512_mul_ps(_mm512_add_ps(t, one), half);
      t = _mm512_sub_ps(_mm512_add_ps(clamp_ps(t, c1lo, c1hi), M), M);
      t = _mm512_sub_ps(clamp_ps(t, c2lo, c2hi), off);
      b[i] = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(t));  // codes are 0..255
    }
    __m512i v = _mm512_castsi128_si512(b[0]);
    v = _mm512_inserti32x4(v, b[1], 1);
    v = _mm512_inserti32x4(v, b[2], 2);
    v = _mm512_inserti32x4(v, b[3], 3);
    uint64_t planes[8];
    for (int p = 0; p < bits; ++p) {
      planes[p] = _mm512_test_epi8_mask(v, _mm512_set1_epi8(char(1 << p)));
      out[p * plane_stride + w] = planes[p];
    }
    sum += plane_sum(planes, bits);
  }
  if (nanm) *nan = true;
  return sum;
}

// ---- float epilogue: int64 -> double (vcvtqq2pd), the scalar driver's multiplications in
// its order, double -> float, scattered to the original column order ---------------------
void avx512_epilogue_f32(const int64_t* acc, int64_t n, double segscale, bool has_ar, double ar,
                         const float* b_row, const int64_t* perm, float* out_row) {
  const __m512d zero = _mm512_setzero_pd(), vs = _mm512_set1_pd(segscale), va = _mm512_set1_pd(ar);
  for (int64_t j = 0; j < n; j += 8) {
    const __mmask8 m = n - j >= 8 ? __mmask8(0xFF) : __mmask8((1u << (n - j)) - 1u);
    const __m512i idx = _mm512_maskz_loadu_epi64(m, perm + j);
    __m512d v = _mm512_add_pd(zero, _mm512_mul_pd(_mm512_cvtepi64_pd(_mm512_maskz_loadu_epi64(m, acc + j)), vs));
    if (has_ar) v = _mm512_mul_pd(v, va);
    if (b_row) v = _mm512_mul_pd(v, _mm512_cvtps_pd(_mm512_mask_i64gather_ps(_mm256_setzero_ps(), m, idx, b_row, 4)));
    _mm512_mask_i64scatter_ps(out_row, m, idx, _mm512_cvtpd_ps(v), 4);
  }
}

}  // namespace

const KernelTable& kernels_avx512() {
  static const KernelTable t{"avx512", avx512_bitserial, avx512_pack_planes, avx512_unpack_planes,
                             avx512_bytes_planes, 2, 4, nullptr, nullptr, avx512_quant_pack,
                             avx512_epilogue_f32};
  return t;
}

}  // namespace soniq
