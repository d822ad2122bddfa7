// AMX-INT8 GEMM over the weight execution layout (cpp/wlayout.h), for many A rows. The body of
// two translation units: kernels_amx.cpp (the tile instructions, AMX flags) and
// kernels_amx_emu.cpp (the same code on cpp/amx_emu.h, for tests on CPUs without AMX). The
// includer defines SONIQ_AMX_NS and the SONIQ_TILE_* operations.
//
// Per 64 columns the weight codes of all of K (up to the int32 limit) are decoded once into a
// buffer (an 8-bit layout is read in place: its groups are the decoded bytes), exactly as the
// AVX-512 kernel does: a decoded group (4 K codes x 16 columns, 64
// bytes) is one row of an AMX B tile, so 16 consecutive groups (K = 64) are a B tile of 1 KiB
// with a 64-byte stride, and the A bytes (K contiguous per row) are A tiles as they lie. Per
// 32 rows x 32 columns: 2 A tiles x 2 B tiles into 4 int32 C tiles (tmm0-3), TDPBUSD (u8 x s8,
// the vpdpbusd product: the same integers as the AVX-512 kernel, so the same outputs), then
// the C tiles go to a 32 x 64 int32 strip that the shared epilogue or int64 store reads.
// A tail strip of 16 rows loads its A tile in place; other tails read a zero-padded copy.
// Calls of fewer than 16 rows run the AVX-512 kernel (kMinTileRows).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <type_traits>

#include "kernels_avx512_layout.h"

namespace soniq::SONIQ_AMX_NS {

// Tiles of fewer A rows than one A tile (16) run the AVX-512 kernel: a zero-padded tile pays
// for 16 rows, and 6-12 rows ran 1.0-1.45x slower on the tiles (PackedLinear, N x K 1536 x 384
// and 384 x 1536, 4- and 8-bit weights, 2 threads; from 16 rows on the tiles win, 0.73-0.95x).
constexpr int64_t kMinTileRows = 16;
// K steps (of 64) per sub-block where a block's K is long (see gemm_bits): 4 B tiles x 8 steps
// = 32 KiB of decoded weights, within L1 with the strip's 16 KiB of A
constexpr int64_t kSubSteps = 8;
// ... for calls of at most this many rows. PackedLinear, 2 threads, K = 1536 and 2048, against
// whole-K strips: calls of 128-256 rows 0.79-0.96x the time (128 x 384 x 1536, 256 x 2048^2,
// 512 x 384 x 1536), of 512 rows 1.10-1.29x (2048^3, 4096 x 384 x 1536: the sub-blocks re-read
// the task's 1 MiB of A and move its C tiles through L2)
constexpr int64_t kSubBlockMaxRows = 256;

#include "layout_avx512_common.inl"

namespace {

// Tiles: tmm0-3 C (rows 0-15 / 16-31 x columns 0-15 / 16-31), tmm4-5 A, tmm6-7 B; all 16 x 64 bytes.
struct alignas(64) Config {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// Loaded at every call: other code on this thread (oneDNN's AMX kernels under torch) may
// have configured the tiles differently since; released at the end (tiles back to INIT).
struct TileScope {
  TileScope() {
    static const Config cfg;
    SONIQ_TILE_LOADCONFIG(&cfg);
  }
  ~TileScope() { SONIQ_TILE_RELEASE(); }
};

// The calling thread's copy of a tail strip's A rows (fewer than 32), kb bytes each, zero-padded to 32.
const uint8_t* pad_rows(const uint8_t* a, int64_t lda, int rows, int64_t kb) {
  uint8_t* buf = reinterpret_cast<uint8_t*>(thread_buffer<1>(32 * kb));
  for (int r = 0; r < rows; ++r) std::memcpy(buf + r * kb, a + r * lda, size_t(kb));
  std::memset(buf + rows * kb, 0, size_t((32 - rows) * kb));
  return buf;
}

// 32 rows x 32 columns (B tiles b0, b1: 16 groups of 64 bytes per K step of 64, 1 KiB) over
// ksteps of K = 64, into the strip tile (row stride 64 int32) at column c. Rows 16-31 only
// when hi. The C tiles start at 0, or (more) at what the strip holds from the K sub-blocks
// before, stored there by these tiles. (Started at the code-sum terms instead, written to the
// strip by vector stores, a 2048 x 1536 x 384 layer ran 1.2-1.4x slower: the tile loads wait
// on the stores.)
inline void tile_block(const uint8_t* a, int64_t sa, const int8_t* b0, const int8_t* b1, int64_t ksteps, bool hi,
                       int32_t* strip, int c, bool more) {
  if (more) {
    SONIQ_TILE_LOADD(0, strip + c, 256);
    SONIQ_TILE_LOADD(1, strip + c + 16, 256);
    if (hi) {
      SONIQ_TILE_LOADD(2, strip + 16 * 64 + c, 256);
      SONIQ_TILE_LOADD(3, strip + 16 * 64 + c + 16, 256);
    }
  } else {
    SONIQ_TILE_ZERO(0);
    SONIQ_TILE_ZERO(1);
    if (hi) {
      SONIQ_TILE_ZERO(2);
      SONIQ_TILE_ZERO(3);
    }
  }
  for (int64_t s = 0; s < ksteps; ++s) {
    SONIQ_TILE_LOADD(4, a + s * 64, sa);
    SONIQ_TILE_LOADD(6, b0 + s * 1024, 64);
    SONIQ_TILE_LOADD(7, b1 + s * 1024, 64);
    SONIQ_TILE_DPBUSD(0, 4, 6);
    SONIQ_TILE_DPBUSD(1, 4, 7);
    if (hi) {
      SONIQ_TILE_LOADD(5, a + 16 * sa + s * 64, sa);
      SONIQ_TILE_DPBUSD(2, 5, 6);
      SONIQ_TILE_DPBUSD(3, 5, 7);
    }
  }
  SONIQ_TILE_STORED(0, strip + c, 256);
  SONIQ_TILE_STORED(1, strip + c + 16, 256);
  if (hi) {
    SONIQ_TILE_STORED(2, strip + 16 * 64 + c, 256);
    SONIQ_TILE_STORED(3, strip + 16 * 64 + c + 16, 256);
  }
}

template <int BITS>
void gemm_bits(const uint8_t* A, int64_t lda, int64_t M, const int8_t* L, int64_t N, int64_t kw, int64_t* C,
               int64_t ldc, int shift, const int64_t* rowterm, const int64_t* colterm, const LayoutEpilogue* ep) {
  const int64_t tb = 2 * kw * BITS * 64, ntiles = (N + 15) / 16, nchunks = 2 * kw;
  const int64_t blk = std::min(nchunks, kMaxChunksInt32);  // K block: all of K up to the int32 limit
  const int64_t ts = blk * 512;                             // one tile's groups in the buffer
  int8_t* buf = decode_buffer(4 * ts);
  alignas(64) int32_t strip[32 * 64];
  ColBlock cb;
  // a tail strip of rows other than 16 (those load as one A tile in place) is read from a
  // zero-padded copy of its rows over all of K, made once for every column block
  const int64_t tail0 = M / 32 * 32, kb = nchunks * 32;
  const int tail_rows = int(M - tail0);
  const uint8_t* tail = tail_rows % 16 ? pad_rows(A + tail0 * lda, lda, tail_rows, kb) : nullptr;
  TileScope tiles;
  for (int64_t t0 = 0; t0 < ntiles; t0 += 4) {
    const int64_t nt = std::min<int64_t>(4, ntiles - t0), nc = std::min<int64_t>(64, N - t0 * 16);
    for (int64_t c0 = 0; c0 < nchunks; c0 += blk) {
      const int64_t ncb = std::min(blk, nchunks - c0);  // even: kw * 64 codes are whole K = 64 steps
      // an 8-bit layout is its own B tiles (groups of 64 bytes, tb bytes from tile to tile)
      const bool in_place = BITS == 8 && nt == 4;
      const int8_t* ops = in_place ? L + t0 * tb + c0 * BITS * 64 : buf;
      const int64_t ots = in_place ? tb : ts;
      if (!in_place) decode_block<BITS>(L, tb, t0, nt, c0, ncb, buf, ts);
      const uint8_t* a = A + c0 * 32;
      int64_t* c = C ? C + t0 * 16 : nullptr;
      const int64_t* ct = colterm ? colterm + t0 * 16 : nullptr;
      LayoutEpilogue e;
      if (ep) e = block_epilogue(*ep, t0, ct, nc, cb);
      const bool first = c0 == 0;
      // K sub-blocks of kSubSteps steps when the block's B is larger than L1 and a few strips
      // share it: each sub-block's B (32 KiB) stays in L1 across all the strips, whose C tiles
      // wait in acc (row stride 64 int32) between sub-blocks (see kSubBlockMaxRows)
      const int64_t steps = ncb / 2;
      const int64_t sub = steps > 2 * kSubSteps && M > 32 && M <= kSubBlockMaxRows ? kSubSteps : steps;
      int32_t* acc = sub < steps ? reinterpret_cast<int32_t*>(thread_buffer<2>((M + 31) / 32 * 32 * 64 * 4)) : nullptr;
      for (int64_t k0 = 0; k0 < steps; k0 += sub) {
        const int64_t nk = std::min(sub, steps - k0);
        for (int64_t i = 0; i < M; i += 32) {
          const int rows = int(std::min<int64_t>(32, M - i));
          const uint8_t* ai = a + i * lda;
          int64_t sa = lda;
          if (rows % 16) ai = tail + c0 * 32, sa = kb;
          int32_t* st = acc ? acc + i * 64 : strip;
          for (int h = 0; h < 2 && h * 32 < nc; ++h)
            tile_block(ai + k0 * 64, sa, ops + 2 * h * ots + k0 * 1024, ops + (2 * h + 1) * ots + k0 * 1024, nk,
                       rows > 16, st, 32 * h, k0 > 0);
          if (k0 + nk < steps) continue;
          if (ep) {
            LayoutEpilogue es = e;
            es.arow += i;
            store_strip(st, rows, es, rowterm + i, cb, nc, shift);
          } else {
            for (int r = 0; r < rows; ++r)
              for (int64_t j = 0; j < nc; j += 16)
                add_lanes(_mm512_load_si512(st + r * 64 + j), out_at(c, ldc, i + r, j, nc, shift, rowterm, ct, first));
          }
        }
      }
    }
  }
}

}  // namespace

void layout_gemm(const uint8_t* A, int64_t lda, int64_t M, const int8_t* L, int bits, int64_t N, int64_t kw,
                 int64_t* C, int64_t ldc, int shift, const int64_t* rowterm, const int64_t* colterm,
                 const LayoutEpilogue* ep) {
  if (M < kMinTileRows) return avx512::layout_gemm(A, lda, M, L, bits, N, kw, C, ldc, shift, rowterm, colterm, ep);
  check_layout_epilogue(ep, rowterm, kw);
  SONIQ_LAYOUT_BY_BITS(gemm_bits, A, lda, M, L, N, kw, C, ldc, shift, rowterm, colterm, ep)
}

}  // namespace soniq::SONIQ_AMX_NS
