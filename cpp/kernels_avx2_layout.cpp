// AVX2 kernels over the weight execution layout (see cpp/wlayout.h for the format). Built
// with the AVX2 flags only: this object must run on AVX2-only CPUs (tests/test_cpu_kernels.py
// checks its disassembly for AVX-512 instructions); runs when the dispatcher picked
// kernels_avx2().
// Without vpdpbusd, vpmaddubsw adds two u8 x s8 products in int16 and vpmaddwd the pairs in
// int32 (FBGEMM's AVX2 int8 step). Exact while a pair stays within int16: A codes <= 255 times
// B codes <= 64. So 1- to 6-bit codes are one operand, and 7- and 8-bit codes are split into
// nibbles, lo (bits 0..3: 0..15) + 16 * hi (7 bits: u >> 4, 0..7; 8 bits, stored as u - 128:
// (u >> 4) - 8, -8..7), two products each, whose small ranges let the GEMM add several
// vpmaddubsw results in int16 before one vpmaddwd (gemm_micro16). The layout is the AVX-512
// kernels' (a 64-byte group is two 32-byte halves of 8 columns x 4 K codes), so a model packed
// on one CPU runs on the other.
#include "kernels_avx2_layout.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <type_traits>

namespace soniq::avx2 {

#include "layout_common.inl"

namespace {

constexpr bool split_bits(int bits) { return bits >= 7; }

inline __m256i load32(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Half h (columns 8h..8h+7) of group G of a chunk: a part of width W at bit position P of the
// code, starting at vector V (as the AVX-512 decode, 32 bytes at a time).
template <int W, int P, int V, int G>
inline __m256i part(const int8_t* ch, int h) {
  constexpr int per = 8 / W, sp = (G % per) * W;
  const __m256i x = load32(ch + (V + G / per) * 64 + h * 32);
  __m256i y = x;
  if constexpr (P > sp) y = _mm256_slli_epi16(x, P - sp);
  if constexpr (P < sp) y = _mm256_srli_epi16(x, sp - P);
  return _mm256_and_si256(y, _mm256_set1_epi8(char(((1 << W) - 1) << P)));
}

// The s8 operand of a half group: the codes (1..6 bits) or their low nibble (7, 8 bits).
template <int BITS, int G>
inline __m256i decode_lo(const int8_t* ch, int h) {
  if constexpr (BITS == 8) return _mm256_and_si256(load32(ch + G * 64 + h * 32), _mm256_set1_epi8(0x0F));
  else if constexpr (BITS == 1 || BITS == 2 || BITS == 4 || BITS == 7) return part<BITS == 7 ? 4 : BITS, 0, 0, G>(ch, h);
  else if constexpr (BITS == 3) return _mm256_or_si256(part<2, 0, 0, G>(ch, h), part<1, 2, 2, G>(ch, h));
  else if constexpr (BITS == 5) return _mm256_or_si256(part<4, 0, 0, G>(ch, h), part<1, 4, 4, G>(ch, h));
  else return _mm256_or_si256(part<4, 0, 0, G>(ch, h), part<2, 4, 4, G>(ch, h));  // 6
}

// The high operand of 7- and 8-bit codes (code = lo + 16 * hi).
template <int BITS, int G>
inline __m256i decode_hi(const int8_t* ch, int h) {
  if constexpr (BITS == 7) {  // its parts of 2 and 1 bits, at bits 0 and 2 of hi
    return _mm256_or_si256(part<2, 0, 4, G>(ch, h), part<1, 2, 6, G>(ch, h));
  } else {  // stored b = u ^ 0x80: (b >> 4) & 15 = (u >> 4) ^ 8, so u - 128 = lo + 16 * ((((b >> 4) & 15) ^ 8) - 8)
    const __m256i q = _mm256_and_si256(_mm256_srli_epi16(load32(ch + G * 64 + h * 32), 4), _mm256_set1_epi8(0x0F));
    return _mm256_sub_epi8(_mm256_xor_si256(q, _mm256_set1_epi8(8)), _mm256_set1_epi8(8));
  }
}
constexpr int kHiShift = 4;  // a hi operand's products count 16 times

inline __m256i bcast4(const uint8_t* p) {  // 4 A codes to every lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// acc + the 8 lanes' sums of 4 products a * b (each pair within int16: see the top)
inline __m256i dot(__m256i acc, __m256i a, __m256i b) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
}
// the same for a high operand, worth 16 each
inline __m256i dot_hi(__m256i acc, __m256i a, __m256i b) {
  return _mm256_add_epi32(acc, _mm256_slli_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)), kHiShift));
}

// C[0..nc) of one row = base + (lanes << shift), as int64 (base: rowterm + colterm[j] in the
// first K block when rowterm is set, else C itself). Once per row and K block of 32768 codes.
inline void store_lanes(const int32_t* lanes, int64_t nc, int64_t* c, int shift, const int64_t* col, int64_t row) {
  const int64_t scale = int64_t(1) << shift;  // (a multiply: << of a negative value is undefined)
  for (int64_t j = 0; j < nc; ++j) c[j] = (col ? col[j] + row : c[j]) + int64_t(lanes[j]) * scale;
}

// ---- GEMV: RM rows x NT tiles, all of K; one pass over the weight bytes --------------------
constexpr int64_t kGemvAhead = 1024;  // prefetch distance per stream (as the AVX-512 GEMV)

template <int BITS, int RM, int NT>
void gemv_micro(const uint8_t* A, int64_t lda, const int8_t* L, int64_t tb, int64_t nchunks, int64_t* C,
                int64_t ldc, int64_t nc, int shift, const int64_t* rowterm, const int64_t* colterm) {
  for (int64_t c0 = 0; c0 < nchunks; c0 += kMaxChunksInt32) {
    const int64_t c1 = std::min(nchunks, c0 + kMaxChunksInt32);
    __m256i acc[RM][NT][2];
    for (int i = 0; i < RM; ++i)
      for (int t = 0; t < NT; ++t) acc[i][t][0] = acc[i][t][1] = _mm256_setzero_si256();
    for (int64_t c = c0; c < c1; ++c) {
      const int8_t* ch = L + c * BITS * 64;
      const uint8_t* a = A + c * 32;
      for (int t = 0; t < NT; ++t)
        for (int v = 0; v < BITS; ++v) _mm_prefetch(reinterpret_cast<const char*>(ch + t * tb + kGemvAhead + v * 64), _MM_HINT_T1);
      for_groups([&](auto gc) {
        constexpr int G = decltype(gc)::value;
        __m256i av[RM];
        for (int i = 0; i < RM; ++i) av[i] = bcast4(a + i * lda + G * 4);
        for (int t = 0; t < NT; ++t)
          for (int h = 0; h < 2; ++h) {
            const __m256i lo = decode_lo<BITS, G>(ch + t * tb, h);
            for (int i = 0; i < RM; ++i) acc[i][t][h] = dot(acc[i][t][h], av[i], lo);
            if constexpr (split_bits(BITS)) {
              const __m256i hi = decode_hi<BITS, G>(ch + t * tb, h);
              for (int i = 0; i < RM; ++i) acc[i][t][h] = dot_hi(acc[i][t][h], av[i], hi);
            }
          }
      });
    }
    const bool base = c0 == 0 && rowterm;
    for (int i = 0; i < RM; ++i) {
      alignas(32) int32_t lanes[NT * 16];
      for (int t = 0; t < NT; ++t)
        for (int h = 0; h < 2; ++h) _mm256_store_si256(reinterpret_cast<__m256i*>(lanes + t * 16 + h * 8), acc[i][t][h]);
      store_lanes(lanes, std::min<int64_t>(nc, NT * 16), C + i * ldc, shift, base ? colterm : nullptr,
                  base ? rowterm[i] : 0);
    }
  }
}

template <int BITS, int RM>
void gemv_rows(const uint8_t* A, int64_t lda, const int8_t* L, int64_t N, int64_t kw, int64_t* C, int64_t ldc,
               int shift, const int64_t* rowterm, const int64_t* colterm) {
  const int64_t tb = 2 * kw * BITS * 64, ntiles = (N + 15) / 16;
  int64_t t = 0;
  for (; t + 2 <= ntiles; t += 2)
    gemv_micro<BITS, RM, 2>(A, lda, L + t * tb, tb, 2 * kw, C + t * 16, ldc, N - t * 16, shift, rowterm,
                            colterm ? colterm + t * 16 : nullptr);
  if (t < ntiles)
    gemv_micro<BITS, RM, 1>(A, lda, L + t * tb, tb, 2 * kw, C + t * 16, ldc, N - t * 16, shift, rowterm,
                            colterm ? colterm + t * 16 : nullptr);
}

template <int BITS>
void gemv_bits(const uint8_t* A, int64_t lda, int64_t M, const int8_t* L, int64_t N, int64_t kw, int64_t* C,
               int64_t ldc, int shift, const int64_t* rowterm, const int64_t* colterm) {
  int64_t i = 0;
  for (; i + 2 <= M; i += 2)
    gemv_rows<BITS, 2>(A + i * lda, lda, L, N, kw, C + i * ldc, ldc, shift, rowterm ? rowterm + i : nullptr, colterm);
  if (i < M)
    gemv_rows<BITS, 1>(A + i * lda, lda, L, N, kw, C + i * ldc, ldc, shift, rowterm ? rowterm + i : nullptr, colterm);
}

// ---- the float epilogue of a strip (layout_common.inl, ColBlock), 4 doubles at a time ------
inline __m256i lane_mask(int64_t live) {  // lanes 0..live-1 set (live <= 8)
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(live)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

template <bool AR, bool BR, bool BIAS>
void store_strip_f32(const int32_t* tile, int rows, const LayoutEpilogue& ep, const int64_t* rowterm,
                     const ColBlock& cb, int64_t nc, int shift) {
  const __m256d seg = _mm256_set1_pd(ep.segscale), scale = _mm256_set1_pd(double(int64_t(1) << shift));
  const __m256d zero = _mm256_setzero_pd();
  for (int i = 0; i < rows; ++i) {
    const int64_t o = ep.arow[i];
    float* out = ep.out + o * ep.ldo;
    const __m256d row = _mm256_set1_pd(double(rowterm[i]));
    const __m256d ar = _mm256_set1_pd(AR ? double(ep.a_row[o]) : 1.0);
    for (int64_t j = 0; j < nc; j += 8) {
      const int64_t live = std::min<int64_t>(8, nc - j);
      __m128 f[2];
      for (int q = 0; q < 2; ++q) {
        __m256d p = _mm256_cvtepi32_pd(_mm_load_si128(reinterpret_cast<const __m128i*>(tile + i * 64 + j + 4 * q)));
        if (shift) p = _mm256_mul_pd(p, scale);
        const __m256d t = _mm256_add_pd(p, _mm256_add_pd(row, _mm256_load_pd(cb.colterm + j + 4 * q)));
        __m256d v = _mm256_add_pd(_mm256_mul_pd(t, seg), zero);  // 0.0 + t * segscale, as the driver
        if constexpr (AR) v = _mm256_mul_pd(v, ar);
        if constexpr (BR) v = _mm256_mul_pd(v, _mm256_load_pd(cb.b_row + j + 4 * q));
        f[q] = _mm256_cvtpd_ps(v);
      }
      __m256 r = _mm256_set_m128(f[1], f[0]);
      const __m256i m = lane_mask(live);
      if constexpr (BIAS) r = _mm256_add_ps(r, live == 8 ? _mm256_loadu_ps(ep.bias + j) : _mm256_maskload_ps(ep.bias + j, m));
      if (ep.run[j / 8]) {
        if (live == 8) _mm256_storeu_ps(out + ep.ocol[j], r);
        else _mm256_maskstore_ps(out + ep.ocol[j], m, r);
      } else {  // scattered columns
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, r);
        for (int64_t q = 0; q < live; ++q) out[ep.ocol[j + q]] = tmp[q];
      }
    }
  }
}

void store_strip(const int32_t* tile, int rows, const LayoutEpilogue& ep, const int64_t* rowterm, const ColBlock& cb,
                 int64_t nc, int shift) {
  const int k = (ep.a_row ? 4 : 0) | (ep.b_row ? 2 : 0) | (ep.bias ? 1 : 0);
  switch (k) {
    case 0: return store_strip_f32<false, false, false>(tile, rows, ep, rowterm, cb, nc, shift);
    case 1: return store_strip_f32<false, false, true>(tile, rows, ep, rowterm, cb, nc, shift);
    case 2: return store_strip_f32<false, true, false>(tile, rows, ep, rowterm, cb, nc, shift);
    case 3: return store_strip_f32<false, true, true>(tile, rows, ep, rowterm, cb, nc, shift);
    case 4: return store_strip_f32<true, false, false>(tile, rows, ep, rowterm, cb, nc, shift);
    case 5: return store_strip_f32<true, false, true>(tile, rows, ep, rowterm, cb, nc, shift);
    case 6: return store_strip_f32<true, true, false>(tile, rows, ep, rowterm, cb, nc, shift);
    default: return store_strip_f32<true, true, true>(tile, rows, ep, rowterm, cb, nc, shift);
  }
}

// ---- GEMM: per 64 columns, the 4 tiles decoded once (all of K up to the int32 limit) into a
// buffer [tile][group][64 bytes] (7- and 8-bit codes: the lo operands, then the hi ones 4 * ts
// bytes on), then tile by tile (or tile pair) every strip of rows over all of that K into the
// block's int32 sums [M][64], stored once: int64 totals, or the float outputs through the
// epilogue. ------------------------------------------------------------------------------------
template <int BITS>
void decode_block(const int8_t* L, int64_t tb, int64_t t0, int64_t nt, int64_t c0, int64_t ncb, int8_t* buf,
                  int64_t ts) {
  for (int64_t t = 0; t < 4; ++t) {
    int8_t* dst = buf + t * ts;
    if (t >= nt) {
      std::memset(dst, 0, size_t(ncb * 512));
      if constexpr (split_bits(BITS)) std::memset(dst + 4 * ts, 0, size_t(ncb * 512));
      continue;
    }
    for (int64_t c = 0; c < ncb; ++c) {
      const int8_t* ch = L + (t0 + t) * tb + (c0 + c) * BITS * 64;
      for_groups([&](auto gc) {
        constexpr int G = decltype(gc)::value;
        for (int h = 0; h < 2; ++h) {
          int8_t* d = dst + (c * 8 + G) * 64 + h * 32;
          _mm256_store_si256(reinterpret_cast<__m256i*>(d), decode_lo<BITS, G>(ch, h));
          if constexpr (split_bits(BITS))
            _mm256_store_si256(reinterpret_cast<__m256i*>(d + 4 * ts), decode_hi<BITS, G>(ch, h));
        }
      });
    }
  }
}

// RM (<= 2) rows x 2 tiles (32 columns) over ngroups groups (1- to 6-bit codes): per group 4
// buffer loads, RM broadcasts, 8 * RM products; the int32 sums to tile[i * 64 + column].
template <int RM>
inline void gemm_micro(const uint8_t* A, int64_t lda, const int8_t* buf, int64_t ts, int64_t ngroups,
                       int32_t* tile) {
  __m256i acc[RM][4];
  for (int i = 0; i < RM; ++i)
    for (int q = 0; q < 4; ++q) acc[i][q] = _mm256_setzero_si256();
  for (int64_t g = 0; g < ngroups; ++g) {
    const int8_t* bg = buf + g * 64;
    __m256i a[RM];
    for (int i = 0; i < RM; ++i) a[i] = bcast4(A + i * lda + g * 4);
    for (int q = 0; q < 4; ++q) {  // q = tile * 2 + half
      const __m256i b = _mm256_load_si256(reinterpret_cast<const __m256i*>(bg + (q >> 1) * ts + (q & 1) * 32));
      for (int i = 0; i < RM; ++i) acc[i][q] = dot(acc[i][q], a[i], b);
    }
  }
  for (int i = 0; i < RM; ++i)
    for (int q = 0; q < 4; ++q) _mm256_store_si256(reinterpret_cast<__m256i*>(tile + i * 64 + q * 8), acc[i][q]);
}

template <int RM, int RUN, bool ADD>
inline void gemm_micro16_run(const uint8_t* A, int64_t lda, const int8_t* bt, int64_t ngroups, int32_t* tile) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[RM][2];
  for (int i = 0; i < RM; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  auto run = [&](int64_t g0, int64_t len) {  // len <= RUN groups summed in int16
    __m256i s16[RM][2];
    for (int i = 0; i < RM; ++i) s16[i][0] = s16[i][1] = _mm256_setzero_si256();
    for (int64_t g = g0; g < g0 + len; ++g) {
      const __m256i b0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(bt + g * 64));
      const __m256i b1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(bt + g * 64 + 32));
      for (int i = 0; i < RM; ++i) {
        const __m256i a = bcast4(A + i * lda + g * 4);
        s16[i][0] = _mm256_add_epi16(s16[i][0], _mm256_maddubs_epi16(a, b0));
        s16[i][1] = _mm256_add_epi16(s16[i][1], _mm256_maddubs_epi16(a, b1));
      }
    }
    for (int i = 0; i < RM; ++i)
      for (int h = 0; h < 2; ++h) acc[i][h] = _mm256_add_epi32(acc[i][h], _mm256_madd_epi16(s16[i][h], ones));
  };
  int64_t g0 = 0;
  for (; g0 + RUN <= ngroups; g0 += RUN) run(g0, RUN);  // a constant trip count: unrolled
  if (g0 < ngroups) run(g0, ngroups - g0);
  for (int i = 0; i < RM; ++i)
    for (int h = 0; h < 2; ++h) {
      __m256i* t = reinterpret_cast<__m256i*>(tile + i * 64 + h * 8);
      if constexpr (ADD) _mm256_store_si256(t, _mm256_add_epi32(_mm256_load_si256(t), _mm256_slli_epi32(acc[i][h], kHiShift)));
      else _mm256_store_si256(t, acc[i][h]);
    }
}

// The same product with int16 sums: when n * 2 * max(A) * max(B) <= 32767, the vpmaddubsw
// results of n groups add up exactly in int16 (vpaddw) before one vpmaddwd: the multiply ports
// do 1 + 1/n instead of 2 operations per 32 products (4-bit weights with 8-bit activations:
// n = 4; runs of 2, 4 or 8 groups, the largest <= n). RM (<= 2) rows x 1 tile (16 columns); the
// int32 sums to tile[i * 64 + column], or (ADD: the hi operands of a split code) added there
// times 2^kHiShift.
template <int RM, bool ADD = false>
inline void gemm_micro16(const uint8_t* A, int64_t lda, const int8_t* bt, int64_t ngroups, int n, int32_t* tile) {
  if (n >= 8) gemm_micro16_run<RM, 8, ADD>(A, lda, bt, ngroups, tile);
  else if (n >= 4) gemm_micro16_run<RM, 4, ADD>(A, lda, bt, ngroups, tile);
  else gemm_micro16_run<RM, 2, ADD>(A, lda, bt, ngroups, tile);
}

// How many groups' vpmaddubsw results one int16 lane holds exactly (pairs of a <= amax, b <= bmax).
inline int int16_run(int amax, int bmax) {
  const int pair = 2 * amax * bmax;
  return pair == 0 ? 64 : std::max(1, std::min(64, 32767 / pair));
}

// The largest A byte of rows [0, M), bytes [0, nbytes) (nbytes a multiple of 32).
inline int max_byte(const uint8_t* A, int64_t lda, int64_t M, int64_t nbytes) {
  __m256i m = _mm256_setzero_si256();
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < nbytes; k += 32)
      m = _mm256_max_epu8(m, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + i * lda + k)));
  alignas(32) uint8_t v[32];
  _mm256_store_si256(reinterpret_cast<__m256i*>(v), m);
  return *std::max_element(v, v + 32);
}

template <int BITS>
void gemm_bits(const uint8_t* A, int64_t lda, int64_t M, const int8_t* L, int64_t N, int64_t kw, int64_t* C,
               int64_t ldc, int shift, const int64_t* rowterm, const int64_t* colterm, const LayoutEpilogue* ep) {
  constexpr bool SPLIT = split_bits(BITS);
  const int64_t tb = 2 * kw * BITS * 64, ntiles = (N + 15) / 16, nchunks = 2 * kw;
  const int64_t blk = std::min(nchunks, kMaxChunksInt32);  // K block: all of K up to the int32 limit
  const int64_t ts = blk * 512;                             // one tile's groups in the buffer
  int8_t* buf = decode_buffer((SPLIT ? 8 : 4) * ts);
  int32_t* res = reinterpret_cast<int32_t*>(thread_buffer<1>(M * 64 * 4));  // the block's int32 sums
  ColBlock cb;
  for (int64_t c0 = 0; c0 < nchunks; c0 += blk) {
    const int64_t ncb = std::min(blk, nchunks - c0);
    const uint8_t* a = A + c0 * 32;
    // int16 runs of n groups where the codes allow (a split code: its nibbles, hi up to |-8|)
    const int amax = max_byte(a, lda, M, ncb * 32);
    const int n = int16_run(amax, SPLIT ? 15 : (1 << BITS) - 1), n_hi = int16_run(amax, 8);
    const bool base = c0 == 0 && rowterm;
    for (int64_t t0 = 0; t0 < ntiles; t0 += 4) {
      const int64_t nt = std::min<int64_t>(4, ntiles - t0), nc = std::min<int64_t>(64, N - t0 * 16);
      decode_block<BITS>(L, tb, t0, nt, c0, ncb, buf, ts);
      const int64_t* ct = colterm ? colterm + t0 * 16 : nullptr;
      LayoutEpilogue e;
      if (ep) e = block_epilogue(*ep, t0, ct, nc, cb);
      // tile by tile over all rows (its buffer, 16 * K bytes, stays in L1), into res [M][64]
      if (n > 1 || SPLIT) {  // (a split code's n is at least 2: 15 * 255 * 2 * 4 < 32767)
        for (int64_t t = 0; t < nt; ++t) {
          const int8_t* bt = buf + t * ts;
          int64_t i = 0;
          for (; i + 2 <= M; i += 2) {
            gemm_micro16<2>(a + i * lda, lda, bt, ncb * 8, n, res + i * 64 + t * 16);
            if constexpr (SPLIT) gemm_micro16<2, true>(a + i * lda, lda, bt + 4 * ts, ncb * 8, n_hi, res + i * 64 + t * 16);
          }
          if (i < M) {
            gemm_micro16<1>(a + i * lda, lda, bt, ncb * 8, n, res + i * 64 + t * 16);
            if constexpr (SPLIT) gemm_micro16<1, true>(a + i * lda, lda, bt + 4 * ts, ncb * 8, n_hi, res + i * 64 + t * 16);
          }
        }
      } else {
        for (int64_t p = 0; p < (nt + 1) / 2; ++p) {
          int64_t i = 0;
          for (; i + 2 <= M; i += 2) gemm_micro<2>(a + i * lda, lda, buf + 2 * p * ts, ts, ncb * 8, res + i * 64 + p * 32);
          if (i < M) gemm_micro<1>(a + i * lda, lda, buf + 2 * p * ts, ts, ncb * 8, res + i * 64 + p * 32);
        }
      }
      if (ep) {
        for (int64_t i = 0; i < M; i += 8) {
          LayoutEpilogue es = e;
          es.arow += i;
          store_strip(res + i * 64, int(std::min<int64_t>(8, M - i)), es, rowterm + i, cb, nc, shift);
        }
      } else {
        for (int64_t i = 0; i < M; ++i)
          store_lanes(res + i * 64, nc, C + i * ldc + t0 * 16, shift, base ? ct : nullptr, base ? rowterm[i] : 0);
      }
    }
  }
}

}  // namespace


void layout_gemv(const uint8_t* A, int64_t lda, int64_t M, const int8_t* L, int bits, int64_t N, int64_t kw,
                 int64_t* C, int64_t ldc, int shift, const int64_t* rowterm, const int64_t* colterm,
                 const LayoutEpilogue* ep) {
  if (ep) throw std::invalid_argument("layout_gemv: no float epilogue (the driver's pass does it)");
  SONIQ_LAYOUT_BY_BITS(gemv_bits, A, lda, M, L, N, kw, C, ldc, shift, rowterm, colterm)
}

void layout_gemm(const uint8_t* A, int64_t lda, int64_t M, const int8_t* L, int bits, int64_t N, int64_t kw,
                 int64_t* C, int64_t ldc, int shift, const int64_t* rowterm, const int64_t* colterm,
                 const LayoutEpilogue* ep) {
  check_layout_epilogue(ep, rowterm, kw);
  SONIQ_LAYOUT_BY_BITS(gemm_bits, A, lda, M, L, N, kw, C, ldc, shift, rowterm, colterm, ep)
}

}  // namespace soniq::avx2
