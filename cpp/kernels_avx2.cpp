// AVX2 path (built with -mavx2 -mfma -mbmi2 -mpopcnt). Runs only when cpuid says so.
// Never put AVX-512 intrinsics here: this object must run on AVX2-only CPUs
// (tests/test_cpu_kernels.py checks its disassembly for zmm registers).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "bitserial_tiles.inl"
#include "kernels_ref.inl"

namespace soniq {
namespace {

// ---- bit-serial: scalar 64-bit popcnt, RM x RN rows per inner loop ---------------------
// Zen/Intel run 3-4 popcnt per cycle; each loaded A word is reused RN times and each B
// word RM times. Counts of one plane pair fit in 32 bits for kw < 2^26.
template <int RM, int RN>
inline void bs_micro(const uint64_t* A, int pa, int64_t sa, const uint64_t* B, int pb, int64_t sb,
                     int64_t kw, int64_t kw_blk, int64_t* C, int64_t ldc) {
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
    for (int j = 0; j < RN; ++j) C[i * ldc + j] += acc[i][j];
}

struct BsMicro {
  template <int RM, int RN>
  static void run(const uint64_t* A, int pa, int64_t sa, const uint64_t* B, int pb, int64_t sb, int64_t kw,
                  int64_t kw_blk, int64_t* C, int64_t ldc) {
    bs_micro<RM, RN>(A, pa, sa, B, pb, sb, kw, kw_blk, C, ldc);
  }
};

void avx2_bitserial(const uint64_t* A, int pa, int64_t sa, int64_t M, const uint64_t* B, int pb,
                    int64_t sb, int64_t N, int64_t kw, int64_t* C, int64_t ldc) {
  bitserial_tiles<BsMicro, 3>(A, pa, sa, M, B, pb, sb, N, kw, C, ldc);
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

// ---- bytes x planes: expand RN rows of B to int8 once per K block, then vpmaddubsw ------
// Exactness: vpmaddubsw adds two u8*s8 products in int16; with B codes <= 63 a pair is
// <= 2*255*63 < 32767, so B planes 0..5 and 6..7 are expanded and multiplied separately.
constexpr int64_t kBytesKwBlock = 64;  // 4096 codes: int32 lanes hold <= 512 products
constexpr int kLoPlanes = 6;

inline int64_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return int64_t(_mm_cvtsi128_si32(s));
}

template <int RM>
inline void bp_micro(const uint8_t* A, int64_t lda, const int8_t* wb, int64_t wld, int64_t nbytes,
                     int64_t* C, int64_t ldc, int nj, int shift) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[RM][4];
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_si256();
  for (int64_t k = 0; k < nbytes; k += 32) {
    __m256i a[RM];
    for (int i = 0; i < RM; ++i) a[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + i * lda + k));
    for (int j = 0; j < 4; ++j) {
      const __m256i b = _mm256_load_si256(reinterpret_cast<const __m256i*>(wb + j * wld + k));
      for (int i = 0; i < RM; ++i)
        acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(_mm256_maddubs_epi16(a[i], b), ones));
    }
  }
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < nj; ++j) C[i * ldc + j] += hsum_epi32(acc[i][j]) << shift;
}

// Same product with int16 accumulation: when n * 2 * max(A) * max(B) <= 32767, n vpmaddubsw
// results are summed with vpaddw before one vpmaddwd (half the multiply-port work: this is
// the int8 GEMM trick, made exact by bounding n from the actual code ranges).
template <int RM>
inline void bp_micro16(const uint8_t* A, int64_t lda, const int8_t* wb, int64_t wld, int64_t nbytes,
                       int64_t* C, int64_t ldc, int nj, int shift, int n) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[RM][4];
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_si256();
  for (int64_t k0 = 0; k0 < nbytes; k0 += 32 * int64_t(n)) {
    const int64_t k1 = std::min(nbytes, k0 + 32 * int64_t(n));
    __m256i a16[RM][4];
    for (int i = 0; i < RM; ++i)
      for (int j = 0; j < 4; ++j) a16[i][j] = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; k += 32) {
      __m256i a[RM];
      for (int i = 0; i < RM; ++i) a[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + i * lda + k));
      for (int j = 0; j < 4; ++j) {
        const __m256i b = _mm256_load_si256(reinterpret_cast<const __m256i*>(wb + j * wld + k));
        for (int i = 0; i < RM; ++i) a16[i][j] = _mm256_add_epi16(a16[i][j], _mm256_maddubs_epi16(a[i], b));
      }
    }
    for (int i = 0; i < RM; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(a16[i][j], ones));
  }
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < nj; ++j) C[i * ldc + j] += hsum_epi32(acc[i][j]) << shift;
}

// How many vpmaddubsw results fit one int16 lane exactly (pairs of a <= amax, b <= bmax).
inline int int16_run(int amax, int bmax) {
  const int pair = 2 * amax * bmax;
  return pair == 0 ? 64 : std::max(1, std::min(64, 32767 / pair));
}

inline int max_byte(const uint8_t* A, int64_t lda, int64_t M, int64_t nbytes) {
  __m256i m = _mm256_setzero_si256();
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < nbytes; k += 32)
      m = _mm256_max_epu8(m, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + i * lda + k)));
  alignas(32) uint8_t v[32];
  _mm256_store_si256(reinterpret_cast<__m256i*>(v), m);
  return *std::max_element(v, v + 32);
}

template <int RM>
inline void bp_block(const uint8_t* A, int64_t lda, const int8_t* wb, int64_t wld, int64_t nbytes,
                     int64_t* C, int64_t ldc, int nj, int shift, int n) {
  if (n > 1) bp_micro16<RM>(A, lda, wb, wld, nbytes, C, ldc, nj, shift, n);
  else bp_micro<RM>(A, lda, wb, wld, nbytes, C, ldc, nj, shift);
}

typedef uint32_t u32_alias __attribute__((may_alias));  // 32-bit halves of plane words

// Few A rows (GEMV): expansion cannot be amortized over rows, so expand in registers and
// multiply at once (no store/reload). One plane: the cmpeq mask is -1 per set bit, used
// directly as the s8 operand (the sum comes out negated). PB planes are expanded; B codes
// <= 63 keep vpmaddubsw exact (see below).
template <int PB, int RM>
inline void bp_fused_rows(const uint8_t* A, int64_t lda, const uint64_t* B, int64_t sb, int64_t ldb,
                          int64_t kw, int64_t* C, int64_t ldc, int nj, int p0, int shift) {
  const __m256i rep = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                       2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i sel = _mm256_set1_epi64x(int64_t(0x8040201008040201ULL));
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[RM][4];
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_si256();
  const int64_t nj_rows = nj;
  for (int64_t h = 0; h < 2 * kw; ++h) {
    __m256i a[RM];
    for (int i = 0; i < RM; ++i) a[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + i * lda + h * 32));
    for (int j = 0; j < 4; ++j) {
      if (j >= nj_rows) break;
      const u32_alias* row = reinterpret_cast<const u32_alias*>(B + j * ldb) + h;
      __m256i code;
      if (PB == 1) {
        const __m256i x = _mm256_shuffle_epi8(_mm256_set1_epi32(int(row[p0 * sb * 2])), rep);
        code = _mm256_cmpeq_epi8(_mm256_and_si256(x, sel), sel);
      } else {
        code = _mm256_setzero_si256();
        for (int p = 0; p < PB; ++p) {
          const __m256i x = _mm256_shuffle_epi8(_mm256_set1_epi32(int(row[(p0 + p) * sb * 2])), rep);
          const __m256i m = _mm256_cmpeq_epi8(_mm256_and_si256(x, sel), sel);
          code = _mm256_or_si256(code, _mm256_and_si256(m, _mm256_set1_epi8(char(1 << p))));
        }
      }
      for (int i = 0; i < RM; ++i)
        acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(_mm256_maddubs_epi16(a[i], code), ones));
    }
  }
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < nj; ++j) {
      const int64_t v = hsum_epi32(acc[i][j]);
      C[i * ldc + j] += (PB == 1 ? -v : v) << shift;
    }
}

template <int RM>
void bp_fused(const uint8_t* A, int64_t lda, const uint64_t* B, int pb, int64_t sb, int64_t N, int64_t kw,
              int64_t* C, int64_t ldc) {
  // int32 lanes: 2*kw*4 products of <= 255*63 each -> exact for kw < 520 (K < 33,280);
  // longer rows go through K blocks
  constexpr int64_t kMaxKw = 512;
  for (int64_t w0 = 0; w0 < kw; w0 += kMaxKw) {
    const int64_t wb = std::min(kMaxKw, kw - w0);
    for (int64_t j0 = 0; j0 < N; j0 += 4) {
      const int nj = int(std::min<int64_t>(4, N - j0));
      const uint64_t* b = B + j0 * kw + w0;
      const uint8_t* a = A + w0 * 64;
      int64_t* c = C + j0;
      auto run = [&](int planes, int p0, int shift) {
        switch (planes) {
          case 1: bp_fused_rows<1, RM>(a, lda, b, sb, kw, wb, c, ldc, nj, p0, shift); break;
          case 2: bp_fused_rows<2, RM>(a, lda, b, sb, kw, wb, c, ldc, nj, p0, shift); break;
          case 3: bp_fused_rows<3, RM>(a, lda, b, sb, kw, wb, c, ldc, nj, p0, shift); break;
          case 4: bp_fused_rows<4, RM>(a, lda, b, sb, kw, wb, c, ldc, nj, p0, shift); break;
          case 5: bp_fused_rows<5, RM>(a, lda, b, sb, kw, wb, c, ldc, nj, p0, shift); break;
          default: bp_fused_rows<6, RM>(a, lda, b, sb, kw, wb, c, ldc, nj, p0, shift); break;
        }
      };
      run(std::min(pb, kLoPlanes), 0, 0);
      if (pb > kLoPlanes) run(pb - kLoPlanes, kLoPlanes, kLoPlanes);
    }
  }
}

void avx2_bytes_planes(const uint8_t* A, int64_t lda, int64_t M, const uint64_t* B, int pb, int64_t sb,
                       int64_t N, int64_t kw, int64_t* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, int64_t(0));
  if (M <= 2) {  // GEMV-like: in-register expansion beats the expanded-B buffer
    if (M == 2) bp_fused<2>(A, lda, B, pb, sb, N, kw, C, ldc);
    else bp_fused<1>(A, lda, B, pb, sb, N, kw, C, ldc);
    return;
  }
  constexpr int64_t wld = kBytesKwBlock * 64;
  alignas(32) int8_t wlo[4 * wld];
  alignas(32) int8_t whi[4 * wld];
  const int lo_planes = std::min(pb, kLoPlanes);
  for (int64_t w0 = 0; w0 < kw; w0 += kBytesKwBlock) {
    const int64_t wcount = std::min(kBytesKwBlock, kw - w0), nbytes = wcount * 64;
    const int amax = max_byte(A + w0 * 64, lda, M, nbytes);
    const int n_lo = int16_run(amax, (1 << lo_planes) - 1);
    const int n_hi = pb > kLoPlanes ? int16_run(amax, (1 << (pb - kLoPlanes)) - 1) : 1;
    for (int64_t j0 = 0; j0 < N; j0 += 4) {
      const int nj = int(std::min<int64_t>(4, N - j0));
      for (int j = 0; j < 4; ++j) {
        for (int64_t h = 0; h < 2 * wcount; ++h) {
          __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
          if (j < nj) {
            const uint64_t* row = B + (j0 + j) * kw + w0;
            lo = expand32(row, sb, 0, lo_planes, h);
            if (pb > kLoPlanes) hi = expand32(row, sb, kLoPlanes, pb, h);
          }
          _mm256_store_si256(reinterpret_cast<__m256i*>(wlo + j * wld + h * 32), lo);
          if (pb > kLoPlanes) _mm256_store_si256(reinterpret_cast<__m256i*>(whi + j * wld + h * 32), hi);
        }
      }
      const uint8_t* a = A + w0 * 64;
      int64_t i = 0;
      for (; i + 2 <= M; i += 2) {
        bp_block<2>(a + i * lda, lda, wlo, wld, nbytes, C + i * ldc + j0, ldc, nj, 0, n_lo);
        if (pb > kLoPlanes) bp_block<2>(a + i * lda, lda, whi, wld, nbytes, C + i * ldc + j0, ldc, nj, kLoPlanes, n_hi);
      }
      for (; i < M; ++i) {
        bp_block<1>(a + i * lda, lda, wlo, wld, nbytes, C + i * ldc + j0, ldc, nj, 0, n_lo);
        if (pb > kLoPlanes) bp_block<1>(a + i * lda, lda, whi, wld, nbytes, C + i * ldc + j0, ldc, nj, kLoPlanes, n_hi);
      }
    }
  }
}

// ---- table lookup for GEMV rows (T-MAC style, exact) ------------------------------------
// A weight plane's nibble (4 consecutive K bits of one row) indexes a 16-entry table of
// subset sums of the 4 matching activation codes. Tables hold the sums of the codes' low
// and high nibbles separately (<= 60 each, bytes), so vpshufb looks up 32 rows at once and
// sums stay exact: total = lo + 16 * hi, combined with vpmaddubsw. vpshufb needs one K
// group per 128-bit lane and a different row per byte, so 16 rows x 256 K of a plane are
// transposed in registers (16x16 bytes per lane) from the plain plane layout.
// Table layout per 256-code chunk c: [j 0..15][nibble 0..1][part lo/hi][lane 0..1][16],
// lane 0 = group 2j+nibble, lane 1 = group 32+2j+nibble of the chunk.
void avx2_lut_build(const uint8_t* A, int64_t kw, uint8_t* tables) {
  // Two groups per register, one per lane, as lut_planes loads them:
  // table[idx] = sum_t ((idx >> t) & 1) * nibble(a_t), from 4 byte splats and 4 bit masks.
  __m256i mask[4], splat[4];
  for (int t = 0; t < 4; ++t) {
    alignas(32) int8_t mk[32], sp[32];
    for (int i = 0; i < 32; ++i) {
      mk[i] = int8_t(((i & 15) >> t) & 1 ? -1 : 0);
      sp[i] = int8_t(t);
    }
    mask[t] = _mm256_load_si256(reinterpret_cast<const __m256i*>(mk));
    splat[t] = _mm256_load_si256(reinterpret_cast<const __m256i*>(sp));
  }
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const int64_t ngroups = kw * 16, nchunks = (kw + 3) / 4;
  auto load4 = [&](int64_t g) {
    uint32_t v = 0;
    if (g < ngroups) std::memcpy(&v, A + g * 4, 4);
    return int(v);
  };
  for (int64_t c = 0; c < nchunks; ++c)
    for (int j = 0; j < 16; ++j)
      for (int nb = 0; nb < 2; ++nb) {
        const int64_t g = c * 64 + 2 * j + nb;
        const __m256i v = _mm256_setr_epi32(load4(g), 0, 0, 0, load4(g + 32), 0, 0, 0);
        const __m256i lo = _mm256_and_si256(v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
        __m256i tlo = _mm256_setzero_si256(), thi = _mm256_setzero_si256();
        for (int t = 0; t < 4; ++t) {
          tlo = _mm256_add_epi8(tlo, _mm256_and_si256(_mm256_shuffle_epi8(lo, splat[t]), mask[t]));
          thi = _mm256_add_epi8(thi, _mm256_and_si256(_mm256_shuffle_epi8(hi, splat[t]), mask[t]));
        }
        uint8_t* out = tables + ((c * 16 + j) * 2 + nb) * 64;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), tlo);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32), thi);
      }
}

// 16 rows x 32 bytes -> t[b] = byte b (lane 0) / 16+b (lane 1) of rows 0..15.
inline void transpose16x16_lanes(const __m256i* x, __m256i* t) {
  __m256i s1[2][8], s2[4][4], s3[8][2];
  for (int i = 0; i < 8; ++i) {
    s1[0][i] = _mm256_unpacklo_epi8(x[2 * i], x[2 * i + 1]);
    s1[1][i] = _mm256_unpackhi_epi8(x[2 * i], x[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h)
    for (int m = 0; m < 4; ++m) {
      s2[2 * h][m] = _mm256_unpacklo_epi16(s1[h][2 * m], s1[h][2 * m + 1]);
      s2[2 * h + 1][m] = _mm256_unpackhi_epi16(s1[h][2 * m], s1[h][2 * m + 1]);
    }
  for (int q = 0; q < 4; ++q)
    for (int o = 0; o < 2; ++o) {
      s3[2 * q][o] = _mm256_unpacklo_epi32(s2[q][2 * o], s2[q][2 * o + 1]);
      s3[2 * q + 1][o] = _mm256_unpackhi_epi32(s2[q][2 * o], s2[q][2 * o + 1]);
    }
  for (int e = 0; e < 8; ++e) {
    t[2 * e] = _mm256_unpacklo_epi64(s3[e][0], s3[e][1]);
    t[2 * e + 1] = _mm256_unpackhi_epi64(s3[e][0], s3[e][1]);
  }
}

// 16 rows (nrows valid) of B, planes 0..pb-1, codes [w0, w0 + wcount) words; adds into acc32
// (rows 4q..4q+3 in acc32[q], both lanes: fold at the end).
inline void lut_rows16(const uint8_t* tables, const uint64_t* B, int pb, int64_t sb, int64_t kw, int nrows,
                       int64_t c0, int64_t c1, __m256i* acc32) {
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const __m256i y16 = _mm256_set1_epi16(0x1001);  // bytes (1, 16): lo + 16 * hi
  const __m256i zero = _mm256_setzero_si256();
  for (int p = 0; p < pb; ++p) {
    const uint64_t* plane = B + p * sb;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t w = c * 4, valid = std::min<int64_t>(4, kw - w);
      __m256i x[16], t[16];
      const __m256i lmask = _mm256_cmpgt_epi64(_mm256_set1_epi64x(valid), _mm256_setr_epi64x(0, 1, 2, 3));
      for (int r = 0; r < nrows; ++r)  // 16 chunks (512 B) ahead for DRAM latency; prefetches never fault
        _mm_prefetch(reinterpret_cast<const char*>(plane + r * kw + w + 64), _MM_HINT_T0);
      for (int r = 0; r < 16; ++r) {
        if (r >= nrows) x[r] = zero;
        else if (valid == 4) x[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(plane + r * kw + w));
        else x[r] = _mm256_maskload_epi64(reinterpret_cast<const long long*>(plane + r * kw + w), lmask);
      }
      transpose16x16_lanes(x, t);
      const uint8_t* tb = tables + c * 2048;
      __m256i acc16a = zero, acc16b = zero;
      for (int j = 0; j < 16; j += 2) {
        __m256i slo = zero, shi = zero;
        for (int jj = j; jj < j + 2; ++jj) {
          const __m256i i0 = _mm256_and_si256(t[jj], nib);
          const __m256i i1 = _mm256_and_si256(_mm256_srli_epi16(t[jj], 4), nib);
          const uint8_t* e = tb + jj * 128;
          slo = _mm256_add_epi8(slo, _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(e)), i0));
          shi = _mm256_add_epi8(shi, _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(e + 32)), i0));
          slo = _mm256_add_epi8(slo, _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(e + 64)), i1));
          shi = _mm256_add_epi8(shi, _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(e + 96)), i1));
        }
        // slo, shi <= 4 * 60 = 240; rows 0..7 / 8..15 as int16 lo + 16*hi <= 4080
        acc16a = _mm256_add_epi16(acc16a, _mm256_maddubs_epi16(_mm256_unpacklo_epi8(slo, shi), y16));
        acc16b = _mm256_add_epi16(acc16b, _mm256_maddubs_epi16(_mm256_unpackhi_epi8(slo, shi), y16));
      }
      // 8 additions of <= 4080: < 32768. Widen, weight by 2^p.
      const __m128i sh = _mm_cvtsi32_si128(p);
      acc32[0] = _mm256_add_epi32(acc32[0], _mm256_sll_epi32(_mm256_unpacklo_epi16(acc16a, zero), sh));
      acc32[1] = _mm256_add_epi32(acc32[1], _mm256_sll_epi32(_mm256_unpackhi_epi16(acc16a, zero), sh));
      acc32[2] = _mm256_add_epi32(acc32[2], _mm256_sll_epi32(_mm256_unpacklo_epi16(acc16b, zero), sh));
      acc32[3] = _mm256_add_epi32(acc32[3], _mm256_sll_epi32(_mm256_unpackhi_epi16(acc16b, zero), sh));
    }
  }
}

void avx2_lut_planes(const uint8_t* tables, int64_t M, const uint64_t* B, int pb, int64_t sb, int64_t N,
                     int64_t kw, int64_t* C, int64_t ldc) {
  const int64_t nchunks = (kw + 3) / 4;
  // Each of the 16 rows of a plane is streamed sequentially over K (long streams the
  // prefetchers follow; weights come from DRAM in GEMV), tables are re-read from L2.
  // int32 lanes: per chunk and all planes <= 32640 * 255; 64 chunks x 2 lanes < 2^31.
  constexpr int64_t kChunkBlock = 64;
  for (int64_t i = 0; i < M; ++i) {
    const uint8_t* tab = tables + i * lut_bytes(kw);
    for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = 0;
    for (int64_t j0 = 0; j0 < N; j0 += 16) {
      const int nrows = int(std::min<int64_t>(16, N - j0));
      for (int64_t c0 = 0; c0 < nchunks; c0 += kChunkBlock) {
        const int64_t c1 = std::min(nchunks, c0 + kChunkBlock);
        __m256i acc32[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                            _mm256_setzero_si256()};
        lut_rows16(tab, B + j0 * kw, pb, sb, kw, nrows, c0, c1, acc32);
        alignas(32) int32_t rows[16];
        for (int q = 0; q < 4; ++q)
          _mm_store_si128(reinterpret_cast<__m128i*>(rows + 4 * q),
                          _mm_add_epi32(_mm256_castsi256_si128(acc32[q]), _mm256_extracti128_si256(acc32[q], 1)));
        for (int r = 0; r < nrows; ++r) C[i * ldc + j0 + r] += rows[r];
      }
    }
  }
}

// ---- fused activation quantize + pack: 32 floats -> 32 byte codes in one ymm, then one
// shift + vpmovmskb per bit plane gives half of that plane's word ---------------------------
inline __m256 clamp_ps(__m256 v, __m256 lo, __m256 hi) { return _mm256_min_ps(_mm256_max_ps(v, lo), hi); }

int64_t avx2_quant_pack(const float* x_, const int64_t* idx, int64_t klen, int64_t kw, float inv, float lo,
                        float hi, int alpha, int bits, uint64_t* out, int64_t plane_stride, bool* nan) {
  const __m256 vinv = _mm256_set1_ps(inv), M = _mm256_set1_ps(12582912.0f);
  // the order of operations of quantize.cpp (see avx512_quant_pack)
  const bool a1 = alpha == 1;
  const __m256 c1lo = _mm256_set1_ps(a1 ? lo - 1.0f : -2.0f), c1hi = _mm256_set1_ps(a1 ? hi + 1.0f : 3.0f);
  const __m256 c2lo = _mm256_set1_ps(a1 ? lo : 0.0f), c2hi = _mm256_set1_ps(a1 ? hi : 1.0f);
  const __m256 off = _mm256_set1_ps(a1 ? lo : 0.0f), one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the per-lane packs
  __m256 nanv = _mm256_setzero_ps();
  int64_t sum = 0;
  alignas(32) float tmp[64];
  for (int64_t w = 0; w < kw; ++w) {
    const float* xs = word_floats(x_, idx, klen, w, tmp);
    __m256i v[2];
    for (int h = 0; h < 2; ++h) {
      __m256i c[4];
      for (int i = 0; i < 4; ++i) {
        const __m256 x = _mm256_loadu_ps(xs + h * 32 + 8 * i);
        nanv = _mm256_or_ps(nanv, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        __m256 t = _mm256_mul_ps(x, vinv);
        if (!a1) t = _mm256_mul_ps(_mm256_add_ps(t, one), half);
        t = _mm256_sub_ps(_mm256_add_ps(clamp_ps(t, c1lo, c1hi), M), M);
        c[i] = _mm256_cvttps_epi32(_mm256_sub_ps(clamp_ps(t, c2lo, c2hi), off));
      }
      const __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
      v[h] = _mm256_permutevar8x32_epi32(b, order);
    }
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
  if (_mm256_movemask_ps(nanv)) *nan = true;
  return sum;
}

}  // namespace

const KernelTable& kernels_avx2() {
  // Measured (bench/results/bench_cpp_amd-epyc.json, single core): bit-serial wins only for
  // 1x1 bits against vpmaddubsw with int16 runs (M16/M64: 300 vs 190-220 GOP/s; 1x2: 152 vs
  // 170-210), and up to 1x2 against the table lookup for GEMV rows (1x2: 147 vs 83; 2x2: 74 vs 83).
  static const KernelTable t = [] {
    KernelTable k;
    k.name = "avx2";
    k.bitserial = avx2_bitserial;
    k.pack_planes = avx2_pack_planes;
    k.unpack_planes = avx2_unpack_planes;
    k.bytes_planes = avx2_bytes_planes;
    k.bitserial_max_pairs = 1;
    k.bitserial_max_pairs_gemv = 2;
    k.lut_build = avx2_lut_build;
    k.lut_planes = avx2_lut_planes;
    k.quant_pack = avx2_quant_pack;
    return k;
  }();
  return t;
}

}  // namespace soniq
