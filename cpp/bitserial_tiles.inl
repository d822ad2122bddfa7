// The bit-serial GEMM's tiling, shared by the ISA translation units: each includes this
// file and instantiates it with its own micro-kernel, so the loop is compiled with that
// unit's flags (internal linkage, as kernels_ref.inl). Micro::run<RM, RN> adds one RM x RN
// block of (sum_{p,q} popcount(A_p & B_q) << (p + q)) << shift into C over kw_blk words.
#pragma once

#include <algorithm>
#include <cstdint>

namespace soniq {
namespace {

template <class Micro, int RM>
inline void bs_row_strip(const uint64_t* A, int pa, int64_t sa, const uint64_t* B, int pb, int64_t sb,
                         int64_t N, int64_t kw, int64_t kw_blk, int64_t* C, int64_t ldc, int shift) {
  int64_t j = 0;
  for (; j + 4 <= N; j += 4) Micro::template run<RM, 4>(A, pa, sa, B + j * kw, pb, sb, kw, kw_blk, C + j, ldc, shift);
  for (; j < N; ++j) Micro::template run<RM, 1>(A, pa, sa, B + j * kw, pb, sb, kw, kw_blk, C + j, ldc, shift);
}

// C[M][N] (ldc) += the bit-serial product << shift; rows in strips of RM_TILE, K in blocks of 128
// words (8192 K per pass keeps a 64-row B strip in L2).
template <class Micro, int RM_TILE>
inline void bitserial_tiles(const uint64_t* A, int pa, int64_t sa, int64_t M, const uint64_t* B, int pb,
                            int64_t sb, int64_t N, int64_t kw, int64_t* C, int64_t ldc, int shift) {
  constexpr int64_t kKwBlock = 128;
  for (int64_t w0 = 0; w0 < kw; w0 += kKwBlock) {
    const int64_t wb = std::min(kKwBlock, kw - w0);
    int64_t i = 0;
    for (; i + RM_TILE <= M; i += RM_TILE)
      bs_row_strip<Micro, RM_TILE>(A + i * kw + w0, pa, sa, B + w0, pb, sb, N, kw, wb, C + i * ldc, ldc, shift);
    for (; i < M; ++i) bs_row_strip<Micro, 1>(A + i * kw + w0, pa, sa, B + w0, pb, sb, N, kw, wb, C + i * ldc, ldc, shift);
  }
}

}  // namespace
}  // namespace soniq
