// AVX-512 VNNI kernels over the weight execution layout (see cpp/wlayout.h for the format).
// Built with the AVX-512 flags; runs only when the dispatcher picked kernels_avx512().
#include "kernels_avx512_layout.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <type_traits>

// GCC 12 headers: _mm512_set1_* / reductions trip a false -Wmaybe-uninitialized
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace soniq::avx512 {

#include "layout_avx512_common.inl"

namespace {

inline __m512i bcast4(const uint8_t* p) {  // 4 A codes to every lane (vpbroadcastd m32)
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

constexpr int64_t kGemvAhead = 1024;
// into L2, not L1: an L1 prefetch holds one of the core's few L1 miss buffers for the whole
// DRAM latency, capping the bytes in flight (weights from DRAM, Zen 4: W2/W4/W8 14336x4096
// 10-15% faster on 1 and 2 threads; the L1 prefetchers bring the lines the last step)
constexpr auto kGemvHint = _MM_HINT_T1;
// gemv_b1 reads one stream (the 4-tile kernels read 4, each kGemvAhead ahead): as many bytes
// in flight needs 4x the distance (weights from DRAM, 1 thread, W1A8 14336x4096 PackedLinear:
// 1 KiB ahead 0.99-1.05 ms, 4 KiB ahead 0.47 ms)
constexpr int64_t kGemvAheadB1 = 4 * kGemvAhead;

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
        for (int v = 0; v < BITS; ++v) _mm_prefetch(reinterpret_cast<const char*>(ch + t * tb + kGemvAhead + v * 64), kGemvHint);
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

// 1-bit weights, one A row, one tile: group G's codes are bit G of the chunk's one vector, so
// an and alone (no shift) gives the s8 operand 2^G * u (-128 * u for G = 7). Each G keeps its
// own accumulator, scaled back exactly at the end (its lanes are multiples of 2^G: >> G): per
// 64 weight bytes 8 and + 8 vpdpbusd, where the shared decode adds 7 shifts. Named
// accumulators, one tile: as arrays, or with two tiles, GCC moved them through the stack.
#define SONIQ_B1_STEP(G) \
  p##G = _mm512_dpbusd_epi32(p##G, bcast4(a + G * 4), _mm512_and_si512(x, _mm512_set1_epi8(char(1 << G))));
void gemv_b1(const uint8_t* A, const int8_t* L, int64_t nchunks, int64_t* C, int64_t nc, int shift,
             const int64_t* rowterm, const int64_t* colterm) {
  for (int64_t c0 = 0; c0 < nchunks; c0 += kMaxChunksInt32) {
    const int64_t c1 = std::min(nchunks, c0 + kMaxChunksInt32);
    __m512i p0 = _mm512_setzero_si512(), p1 = p0, p2 = p0, p3 = p0, p4 = p0, p5 = p0, p6 = p0, p7 = p0;
    for (int64_t c = c0; c < c1; ++c) {
      const int8_t* ch = L + c * 64;
      const uint8_t* a = A + c * 32;
      _mm_prefetch(reinterpret_cast<const char*>(ch + kGemvAheadB1), kGemvHint);
      const __m512i x = _mm512_loadu_si512(ch);
      SONIQ_B1_STEP(0) SONIQ_B1_STEP(1) SONIQ_B1_STEP(2) SONIQ_B1_STEP(3)
      SONIQ_B1_STEP(4) SONIQ_B1_STEP(5) SONIQ_B1_STEP(6) SONIQ_B1_STEP(7)
    }
    const __m512i lo = _mm512_add_epi32(_mm512_add_epi32(p0, _mm512_srai_epi32(p1, 1)),
                                        _mm512_add_epi32(_mm512_srai_epi32(p2, 2), _mm512_srai_epi32(p3, 3)));
    const __m512i hi = _mm512_add_epi32(_mm512_add_epi32(_mm512_srai_epi32(p4, 4), _mm512_srai_epi32(p5, 5)),
                                        _mm512_srai_epi32(p6, 6));
    add_lanes(_mm512_sub_epi32(_mm512_add_epi32(lo, hi), _mm512_srai_epi32(p7, 7)),
              out_at(C, 0, 0, 0, nc, shift, rowterm, colterm, c0 == 0));
  }
}
#undef SONIQ_B1_STEP

template <int BITS, int RM>
void gemv_rows(const uint8_t* A, int64_t lda, const int8_t* L, int64_t N, int64_t kw, int64_t* C, int64_t ldc,
               int shift, const int64_t* rowterm, const int64_t* colterm) {
  const int64_t tb = 2 * kw * BITS * 64, ntiles = (N + 15) / 16;
  int64_t t = 0;
  if constexpr (BITS == 1 && RM == 1) {
    for (; t < ntiles; ++t)
      gemv_b1(A, L + t * tb, 2 * kw, C + t * 16, N - t * 16, shift, rowterm, colterm ? colterm + t * 16 : nullptr);
    return;
  }
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

// ---- GEMM: per 64 columns, the 4 tiles decoded once (all of K up to the int32 limit) into a
// buffer as plain VNNI operands [tile][group][64 bytes], then RM rows x 4 tiles of
// accumulators per step over all of that K, stored once: int64 totals, or with an epilogue
// the float outputs (no int64 pass). The buffer (K/2 bytes per column: 48 KiB at K = 768)
// sits in L1/L2; per group the step reads 256 bytes of it for 24 vpdpbusd. ----------------

// Named accumulators (as an array GCC stored them every step: 4x slower); NT live tiles.
#define SONIQ_ROW_ACC(i)                                                             \
  __m512i c##i##0 = _mm512_setzero_si512(), c##i##1 = c##i##0, c##i##2 = c##i##0, c##i##3 = c##i##0; \
  if (RM > i && fold) {                                                              \
    const __m512i r = _mm512_set1_epi32(int32_t(rowterm[i]));                        \
    c##i##0 = _mm512_add_epi32(r, _mm512_load_si512(cb->colterm32));                \
    c##i##1 = _mm512_add_epi32(r, _mm512_load_si512(cb->colterm32 + 16));           \
    c##i##2 = _mm512_add_epi32(r, _mm512_load_si512(cb->colterm32 + 32));           \
    c##i##3 = _mm512_add_epi32(r, _mm512_load_si512(cb->colterm32 + 48));           \
  }
#define SONIQ_ROW_STEP(i)                                       \
  if constexpr (RM > i) {                                       \
    const __m512i a = bcast4(A + i * lda + g * 4);              \
    c##i##0 = _mm512_dpbusd_epi32(c##i##0, a, b0);              \
    if constexpr (NT > 1) c##i##1 = _mm512_dpbusd_epi32(c##i##1, a, b1); \
    if constexpr (NT > 2) c##i##2 = _mm512_dpbusd_epi32(c##i##2, a, b2); \
    if constexpr (NT > 3) c##i##3 = _mm512_dpbusd_epi32(c##i##3, a, b3); \
  }
#define SONIQ_ROW_STORE(i)                                                                   \
  if constexpr (RM > i) {                                                                    \
    if (ep) {                                                                                \
      _mm512_store_si512(tile + i * 64, c##i##0);                                            \
      _mm512_store_si512(tile + i * 64 + 16, c##i##1);                                       \
      _mm512_store_si512(tile + i * 64 + 32, c##i##2);                                       \
      _mm512_store_si512(tile + i * 64 + 48, c##i##3);                                       \
    } else {                                                                                 \
      add_lanes(c##i##0, out_at(C, ldc, i, 0, nc, shift, rowterm, colterm, first));          \
      add_lanes(c##i##1, out_at(C, ldc, i, 16, nc, shift, rowterm, colterm, first));         \
      add_lanes(c##i##2, out_at(C, ldc, i, 32, nc, shift, rowterm, colterm, first));         \
      add_lanes(c##i##3, out_at(C, ldc, i, 48, nc, shift, rowterm, colterm, first));         \
    }                                                                                        \
  }

// RM (<= 6) rows x 4 tiles: per group 4 operand loads, RM broadcasts, 4 * RM vpdpbusd.
// DEC = 0: the operands come decoded, ts bytes from one tile's groups to the next's (the
// per-thread buffer, or an 8-bit layout read in place). DEC = bits: the strip decodes the 4
// tiles itself from the layout (L, tb bytes per tile) and leaves them in buf for the strips
// after it: the stores ride in the shadow of its vpdpbusd, where a separate pass over the
// buffer (larger than L1 at K > 512) cost 4-7% of a 2048^3 GEMM. ep: rows' float epilogue
// (arow, rowterm at this strip's first row; ep's columns at the block's first; cb the
// block's column terms).
template <int RM, int DEC, int NT = 4>
inline void gemm_micro(const uint8_t* A, int64_t lda, const int8_t* buf, int64_t ts, int64_t ngroups, int64_t* C,
                       int64_t ldc, int64_t nc, int shift, const int64_t* rowterm, const int64_t* colterm, bool first,
                       const LayoutEpilogue* ep, const ColBlock* cb, bool fold, const int8_t* L = nullptr,
                       int64_t tb = 0) {
  SONIQ_ROW_ACC(0) SONIQ_ROW_ACC(1) SONIQ_ROW_ACC(2) SONIQ_ROW_ACC(3) SONIQ_ROW_ACC(4) SONIQ_ROW_ACC(5)
  if constexpr (DEC == 0) {
    for (int64_t g = 0; g < ngroups; ++g) {
      const int8_t* bg = buf + g * 64;
      const __m512i z = _mm512_setzero_si512(), b0 = _mm512_loadu_si512(bg),
                    b1 = NT > 1 ? _mm512_loadu_si512(bg + ts) : z, b2 = NT > 2 ? _mm512_loadu_si512(bg + 2 * ts) : z,
                    b3 = NT > 3 ? _mm512_loadu_si512(bg + 3 * ts) : z;
      SONIQ_ROW_STEP(0) SONIQ_ROW_STEP(1) SONIQ_ROW_STEP(2) SONIQ_ROW_STEP(3) SONIQ_ROW_STEP(4) SONIQ_ROW_STEP(5)
    }
  } else {
    int8_t* out = const_cast<int8_t*>(buf);
    for (int64_t c = 0; c < ngroups / 8; ++c) {
      const int8_t* ch = L + c * DEC * 64;
      int8_t* d = out + c * 512;
      for (int t = 0; t < 4; ++t)
        for (int v = 0; v < DEC; ++v) _mm_prefetch(reinterpret_cast<const char*>(ch + t * tb + kGemvAhead + v * 64), kGemvHint);
      for_groups([&](auto gc) {
        constexpr int G = decltype(gc)::value;
        const int64_t g = c * 8 + G;
        const __m512i b0 = decode<DEC, G>(ch), b1 = decode<DEC, G>(ch + tb), b2 = decode<DEC, G>(ch + 2 * tb),
                      b3 = decode<DEC, G>(ch + 3 * tb);
        _mm512_store_si512(d + G * 64, b0);
        _mm512_store_si512(d + ts + G * 64, b1);
        _mm512_store_si512(d + 2 * ts + G * 64, b2);
        _mm512_store_si512(d + 3 * ts + G * 64, b3);
        SONIQ_ROW_STEP(0) SONIQ_ROW_STEP(1) SONIQ_ROW_STEP(2) SONIQ_ROW_STEP(3) SONIQ_ROW_STEP(4) SONIQ_ROW_STEP(5)
      });
    }
  }
  alignas(64) int32_t tile[6 * 64];
  SONIQ_ROW_STORE(0) SONIQ_ROW_STORE(1) SONIQ_ROW_STORE(2) SONIQ_ROW_STORE(3) SONIQ_ROW_STORE(4) SONIQ_ROW_STORE(5)
  if (ep) store_strip(tile, RM, *ep, rowterm, *cb, nc, shift, fold);
}
#undef SONIQ_ROW_ACC
#undef SONIQ_ROW_STEP
#undef SONIQ_ROW_STORE

template <int BITS>
void gemm_bits(const uint8_t* A, int64_t lda, int64_t M, const int8_t* L, int64_t N, int64_t kw, int64_t* C,
               int64_t ldc, int shift, const int64_t* rowterm, const int64_t* colterm, const LayoutEpilogue* ep) {
  const int64_t tb = 2 * kw * BITS * 64, ntiles = (N + 15) / 16, nchunks = 2 * kw;
  const int64_t blk = std::min(nchunks, kMaxChunksInt32);  // K block: all of K up to the int32 limit
  const int64_t ts = blk * 512;                             // one tile's groups in the buffer
  int8_t* buf = decode_buffer(4 * ts);
  // with an epilogue: accumulators started at the code-sum terms where int32 holds the totals
  const bool fold = ep && fold_terms(rowterm, colterm, shift);
  ColBlock cb;
  for (int64_t t0 = 0; t0 < ntiles; t0 += 4) {
    const int64_t nt = std::min<int64_t>(4, ntiles - t0), nc = std::min<int64_t>(64, N - t0 * 16);
    for (int64_t c0 = 0; c0 < nchunks; c0 += blk) {
      const int64_t ncb = std::min(blk, nchunks - c0);
      // where the strips find the operands: an 8-bit layout in place; else the buffer, filled
      // by the first strip (whole 64-column blocks of 6 rows or more) or by a pass before
      const bool in_place = BITS == 8 && nt == 4, fused = !in_place && nt == 4 && M >= 6;
      const int8_t* ops = in_place ? L + t0 * tb + c0 * BITS * 64 : buf;
      const int64_t ots = in_place ? tb : ts;
      if (!in_place && !fused) decode_block<BITS>(L, tb, t0, nt, c0, ncb, buf, ts);
      const uint8_t* a = A + c0 * 32;
      int64_t* c = C ? C + t0 * 16 : nullptr;
      const int64_t* rt = rowterm;
      const int64_t* ct = colterm ? colterm + t0 * 16 : nullptr;
      LayoutEpilogue e;
      if (ep) e = block_epilogue(*ep, t0, ct, nc, cb);
      const bool first = c0 == 0;
      auto strip = [&](auto rm, int64_t i) {
        constexpr int RM = decltype(rm)::value;
        LayoutEpilogue es;
        if (ep) {
          es = e, es.arow += i;
          // the next strip's output lines, fetched while this strip computes: a large output
          // (M = 4096, N = 1536: 24 MiB) misses every cache, and each store waited for its line
          for (int64_t r = i + RM; r < std::min(M, i + 2 * RM); ++r)
            for (int64_t j = 0; j < nc; j += 16)
              __builtin_prefetch(e.out + e.arow[r] * e.ldo + e.ocol[j], 1, 3);
        }
        if constexpr (BITS < 8 && RM == 6) {
          if (fused && i == 0) {  // the block's first strip decodes its tiles into buf itself
            gemm_micro<6, BITS>(a, lda, buf, ts, ncb * 8, c, ldc, nc, shift, rt, ct, first, ep ? &es : nullptr,
                                &cb, fold, L + t0 * tb + c0 * BITS * 64, tb);
            return;
          }
        }
        auto run = [&](auto ntc) {  // only the block's live tiles (a tier's last block: 1-3)
          gemm_micro<RM, 0, decltype(ntc)::value>(a + i * lda, lda, ops, ots, ncb * 8, c ? c + i * ldc : nullptr,
                                                  ldc, nc, shift, rt ? rt + i : nullptr, ct, first,
                                                  ep ? &es : nullptr, &cb, fold);
        };
        switch (nt) {
          case 1: run(std::integral_constant<int, 1>{}); break;
          case 2: run(std::integral_constant<int, 2>{}); break;
          case 3: run(std::integral_constant<int, 3>{}); break;
          default: run(std::integral_constant<int, 4>{}); break;
        }
      };
      int64_t i = 0;
      for (; i + 6 <= M; i += 6) strip(std::integral_constant<int, 6>{}, i);
      switch (M - i) {
        case 5: strip(std::integral_constant<int, 5>{}, i); break;
        case 4: strip(std::integral_constant<int, 4>{}, i); break;
        case 3: strip(std::integral_constant<int, 3>{}, i); break;
        case 2: strip(std::integral_constant<int, 2>{}, i); break;
        case 1: strip(std::integral_constant<int, 1>{}, i); break;
        default: break;
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

}  // namespace soniq::avx512
