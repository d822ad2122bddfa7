// AVX-512 VNNI kernels over the weight execution layout (see cpp/wlayout.h for the format).
// Built with the AVX-512 flags; runs only when the dispatcher picked kernels_avx512().
#include "kernels_avx512_layout.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>

// GCC 12 headers: _mm512_set1_* / reductions trip a false -Wmaybe-uninitialized
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace soniq::avx512 {
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

template <class F>
inline void for_groups(F&& f) {  // f(integral_constant<int, G>) for G = 0..7, unrolled
  f(std::integral_constant<int, 0>{}); f(std::integral_constant<int, 1>{});
  f(std::integral_constant<int, 2>{}); f(std::integral_constant<int, 3>{});
  f(std::integral_constant<int, 4>{}); f(std::integral_constant<int, 5>{});
  f(std::integral_constant<int, 6>{}); f(std::integral_constant<int, 7>{});
}

inline __m512i bcast4(const uint8_t* p) {  // 4 A codes to every lane (vpbroadcastd m32)
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
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

// int32 lanes stay exact for this many chunks: 8 vpdpbusd of at most 4 * 255 * 128 each per chunk
constexpr int64_t kMaxChunksInt32 = 1024;

constexpr int64_t kGemvAhead = 1024;

// ---- GEMV: RM rows x NT tiles, all of K; one pass over the weight bytes --------------------
template <int BITS, int RM, int NT>
void gemv_micro(const uint8_t* A, int64_t lda, const int8_t* L, int64_t tb, int64_t nchunks, int64_t* C,
                int64_t ldc, int64_t nc, int shift, const int64_t* rowterm, const int64_t* colterm) {
  constexpr int NA = RM == 1 ? 2 : 1;  // two accumulator sets for one row: 2 * NT independent chains
  for (int64_t c0 = 0; c0 < nchunks; c0 += kMaxChunksInt32) {
    const int64_t c1 = std::min(nchunks, c0 + kMaxChunksInt32);
    __m512i acc[NA][RM][NT];
    for (int s = 0; s < NA; ++s)
      for (int i = 0; i < RM; ++i)
        for (int t = 0; t < NT; ++t) acc[s][i][t] = _mm512_setzero_si512();
    for (int64_t c = c0; c < c1; ++c) {
      const int8_t* ch = L + c * BITS * 64;
      const uint8_t* a = A + c * 32;
      // NT interleaved streams: prefetch each kGemvAhead bytes on, one line per 64 bytes read
      for (int t = 0; t < NT; ++t)
        for (int v = 0; v < BITS; ++v) _mm_prefetch(reinterpret_cast<const char*>(ch + t * tb + kGemvAhead + v * 64), _MM_HINT_T0);
      for_groups([&](auto gc) {
        constexpr int G = decltype(gc)::value;
        __m512i av[RM];
        for (int i = 0; i < RM; ++i) av[i] = bcast4(a + i * lda + G * 4);
        for (int t = 0; t < NT; ++t) {
          const __m512i b = decode<BITS, G>(ch + t * tb);
          for (int i = 0; i < RM; ++i) acc[G % NA][i][t] = _mm512_dpbusd_epi32(acc[G % NA][i][t], av[i], b);
        }
      });
    }
    for (int i = 0; i < RM; ++i)
      for (int t = 0; t < NT; ++t) {
        __m512i v = acc[0][i][t];
        if constexpr (NA == 2) v = _mm512_add_epi32(v, acc[1][i][t]);
        add_lanes(v, out_at(C, ldc, i, t * 16, nc, shift, rowterm, colterm, c0 == 0));
      }
  }
}

template <int BITS, int RM>
void gemv_rows(const uint8_t* A, int64_t lda, const int8_t* L, int64_t N, int64_t kw, int64_t* C, int64_t ldc,
               int shift, const int64_t* rowterm, const int64_t* colterm) {
  const int64_t tb = 2 * kw * BITS * 64, ntiles = (N + 15) / 16;
  int64_t t = 0;
  for (; t + 4 <= ntiles; t += 4)
    gemv_micro<BITS, RM, 4>(A, lda, L + t * tb, tb, 2 * kw, C + t * 16, ldc, N - t * 16, shift, rowterm,
                            colterm ? colterm + t * 16 : nullptr);
  for (; t < ntiles; ++t)  // tail tiles one at a time (fewer instantiations; N % 64 only)
    gemv_micro<BITS, RM, 1>(A, lda, L + t * tb, tb, 2 * kw, C + t * 16, ldc, N - t * 16, shift, rowterm,
                            colterm ? colterm + t * 16 : nullptr);
}

template <int BITS>
void gemv_bits(const uint8_t* A, int64_t lda, int64_t M, const int8_t* L, int64_t N, int64_t kw, int64_t* C,
               int64_t ldc, int shift, const int64_t* rowterm, const int64_t* colterm) {
  int64_t i = 0;
  for (; i + 2 <= M; i += 2) gemv_rows<BITS, 2>(A + i * lda, lda, L, N, kw, C + i * ldc, ldc, shift, rowterm ? rowterm + i : nullptr, colterm);
  if (i < M) gemv_rows<BITS, 1>(A + i * lda, lda, L, N, kw, C + i * ldc, ldc, shift, rowterm ? rowterm + i : nullptr, colterm);
}

// ---- GEMM: per 64 columns and K block, the 4 tiles decoded once into an L1 buffer as plain
// VNNI operands [tile][group][64 bytes], then RM rows x 4 tiles of accumulators per step ------
constexpr int64_t kBlockChunks = 12;  // 384 codes: 4 tiles x 96 groups x 64 bytes = 24 KiB
constexpr int64_t kBufGroups = kBlockChunks * 8;

// Accumulators are named locals, not an array: GCC kept an array of __m512i in memory and
// stored it every step (4x slower).
#define SONIQ_ROW_ACC(i)                                      \
  __m512i c##i##0 = _mm512_setzero_si512(), c##i##1 = c##i##0, \
          c##i##2 = c##i##0, c##i##3 = c##i##0;
#define SONIQ_ROW_STEP(i)                                       \
  if constexpr (RM > i) {                                       \
    const __m512i a = bcast4(A + i * lda + g * 4);              \
    c##i##0 = _mm512_dpbusd_epi32(c##i##0, a, b0);              \
    c##i##1 = _mm512_dpbusd_epi32(c##i##1, a, b1);              \
    c##i##2 = _mm512_dpbusd_epi32(c##i##2, a, b2);              \
    c##i##3 = _mm512_dpbusd_epi32(c##i##3, a, b3);              \
  }
#define SONIQ_ROW_STORE(i)                                      \
  if constexpr (RM > i) {                                       \
    add_lanes(c##i##0, out_at(C, ldc, i, 0, nc, shift, rowterm, colterm, first));  \
    add_lanes(c##i##1, out_at(C, ldc, i, 16, nc, shift, rowterm, colterm, first)); \
    add_lanes(c##i##2, out_at(C, ldc, i, 32, nc, shift, rowterm, colterm, first)); \
    add_lanes(c##i##3, out_at(C, ldc, i, 48, nc, shift, rowterm, colterm, first)); \
  }

// RM (<= 6) rows x 4 tiles: per group 4 buffer loads, RM broadcasts, 4 * RM vpdpbusd
template <int RM>
inline void gemm_micro(const uint8_t* A, int64_t lda, const int8_t* buf, int64_t ngroups, int64_t* C, int64_t ldc,
                       int64_t nc, int shift, const int64_t* rowterm, const int64_t* colterm, bool first) {
  SONIQ_ROW_ACC(0) SONIQ_ROW_ACC(1) SONIQ_ROW_ACC(2) SONIQ_ROW_ACC(3) SONIQ_ROW_ACC(4) SONIQ_ROW_ACC(5)
  for (int64_t g = 0; g < ngroups; ++g) {
    const __m512i b0 = _mm512_load_si512(buf + g * 64), b1 = _mm512_load_si512(buf + (kBufGroups + g) * 64),
                  b2 = _mm512_load_si512(buf + (2 * kBufGroups + g) * 64),
                  b3 = _mm512_load_si512(buf + (3 * kBufGroups + g) * 64);
    SONIQ_ROW_STEP(0) SONIQ_ROW_STEP(1) SONIQ_ROW_STEP(2) SONIQ_ROW_STEP(3) SONIQ_ROW_STEP(4) SONIQ_ROW_STEP(5)
  }
  SONIQ_ROW_STORE(0) SONIQ_ROW_STORE(1) SONIQ_ROW_STORE(2) SONIQ_ROW_STORE(3) SONIQ_ROW_STORE(4) SONIQ_ROW_STORE(5)
}
#undef SONIQ_ROW_ACC
#undef SONIQ_ROW_STEP
#undef SONIQ_ROW_STORE

struct alignas(64) GemmBuffer {
  int8_t b[4 * kBufGroups * 64];
};

template <int BITS>
void gemm_bits(const uint8_t* A, int64_t lda, int64_t M, const int8_t* L, int64_t N, int64_t kw, int64_t* C,
               int64_t ldc, int shift, const int64_t* rowterm, const int64_t* colterm) {
  thread_local std::unique_ptr<GemmBuffer> owned;  // dynamic: no large static TLS in a dlopen'ed module
  if (!owned) owned.reset(new GemmBuffer);
  GemmBuffer& buf = *owned;
  const int64_t tb = 2 * kw * BITS * 64, ntiles = (N + 15) / 16, nchunks = 2 * kw;
  for (int64_t t0 = 0; t0 < ntiles; t0 += 4) {
    const int64_t nt = std::min<int64_t>(4, ntiles - t0), nc = std::min<int64_t>(64, N - t0 * 16);
    for (int64_t c0 = 0; c0 < nchunks; c0 += kBlockChunks) {
      const int64_t ncb = std::min(kBlockChunks, nchunks - c0);
      for (int64_t t = 0; t < 4; ++t)
        for (int64_t c = 0; c < ncb; ++c) {
          int8_t* dst = buf.b + (t * kBufGroups + c * 8) * 64;
          if (t >= nt) {
            std::memset(dst, 0, 512);
            continue;
          }
          const int8_t* ch = L + (t0 + t) * tb + (c0 + c) * BITS * 64;
          for_groups([&](auto gc) {
            constexpr int G = decltype(gc)::value;
            _mm512_store_si512(dst + G * 64, decode<BITS, G>(ch));
          });
        }
      const uint8_t* a = A + c0 * 32;
      int64_t* c = C + t0 * 16;
      const int64_t* rt = rowterm;
      const int64_t* ct = colterm ? colterm + t0 * 16 : nullptr;
      int64_t i = 0;
      for (; i + 6 <= M; i += 6) gemm_micro<6>(a + i * lda, lda, buf.b, ncb * 8, c + i * ldc, ldc, nc, shift, rt ? rt + i : nullptr, ct, c0 == 0);
      switch (M - i) {
        case 5: gemm_micro<5>(a + i * lda, lda, buf.b, ncb * 8, c + i * ldc, ldc, nc, shift, rt ? rt + i : nullptr, ct, c0 == 0); break;
        case 4: gemm_micro<4>(a + i * lda, lda, buf.b, ncb * 8, c + i * ldc, ldc, nc, shift, rt ? rt + i : nullptr, ct, c0 == 0); break;
        case 3: gemm_micro<3>(a + i * lda, lda, buf.b, ncb * 8, c + i * ldc, ldc, nc, shift, rt ? rt + i : nullptr, ct, c0 == 0); break;
        case 2: gemm_micro<2>(a + i * lda, lda, buf.b, ncb * 8, c + i * ldc, ldc, nc, shift, rt ? rt + i : nullptr, ct, c0 == 0); break;
        case 1: gemm_micro<1>(a + i * lda, lda, buf.b, ncb * 8, c + i * ldc, ldc, nc, shift, rt ? rt + i : nullptr, ct, c0 == 0); break;
        default: break;
      }
    }
  }
}


}  // namespace

#define SONIQ_BY_BITS(fn, ...)                 \
  switch (bits) {                              \
    case 1: return fn<1>(__VA_ARGS__);         \
    case 2: return fn<2>(__VA_ARGS__);         \
    case 3: return fn<3>(__VA_ARGS__);         \
    case 4: return fn<4>(__VA_ARGS__);         \
    case 5: return fn<5>(__VA_ARGS__);         \
    case 6: return fn<6>(__VA_ARGS__);         \
    case 7: return fn<7>(__VA_ARGS__);         \
    default: return fn<8>(__VA_ARGS__);        \
  }

void layout_gemv(const uint8_t* A, int64_t lda, int64_t M, const int8_t* L, int bits, int64_t N, int64_t kw,
                 int64_t* C, int64_t ldc, int shift, const int64_t* rowterm, const int64_t* colterm) {
  SONIQ_BY_BITS(gemv_bits, A, lda, M, L, N, kw, C, ldc, shift, rowterm, colterm)
}

void layout_gemm(const uint8_t* A, int64_t lda, int64_t M, const int8_t* L, int bits, int64_t N, int64_t kw,
                 int64_t* C, int64_t ldc, int shift, const int64_t* rowterm, const int64_t* colterm) {
  SONIQ_BY_BITS(gemm_bits, A, lda, M, L, N, kw, C, ldc, shift, rowterm, colterm)
}
#undef SONIQ_BY_BITS

}  // namespace soniq::avx512
