// Staging bit-plane tiles into shared memory with cp.async (sm_80+), shared by the
// popcount GEMM and the binary tensor-core kernel: a 64-row tile, 4 uint64 words (256 K)
// per plane and row per stage, 16-byte copies when the block is 16-byte aligned (8-byte
// otherwise), zero-filled outside the block.
#pragma once
#include "mpgemm_common.cuh"

namespace soniq::cuda::detail {

__device__ __forceinline__ bool aligned16(const uint64_t* p, long long kw) {
  return ((reinterpret_cast<uintptr_t>(p) & 15) == 0) && (kw % 2 == 0);
}

constexpr int kStageRows = 64;   // rows of a and of b per block tile
constexpr int kStageWords = 4;   // uint64 words of K per plane and row per stage (256 K)

// Word w of row r in a staged plane: 16-byte halves swapped on rows with bit 2 set, so
// the 16-byte reads of 8 consecutive rows (one quarter warp) hit 8 distinct bank groups.
__device__ __forceinline__ int swz(int r, int w) { return w ^ (((r >> 2) & 1) << 1); }

// Stages words [c*kStageWords, +kStageWords) of rows [r0, r0 + kStageRows) of `planes`
// planes into dst[plane][row][kStageWords] (swizzled); kThreads threads cooperate.
template <int kThreads>
__device__ __forceinline__ void stage_planes(uint64_t* dst, const uint64_t* g, long long plane_stride, int rows,
                                             int r0, long long kw, int c, int planes, bool al16, int tid) {
  const int units = planes * kStageRows * 2;  // 16-byte units: two per row
  for (int u = tid; u < units; u += kThreads) {
    const int p = u / (kStageRows * 2), rem = u % (kStageRows * 2), r = rem >> 1, h = rem & 1;
    const long long w = (long long)c * kStageWords + 2 * h;
    const bool row_ok = r0 + r < rows;
    const uint64_t* src = g + p * plane_stride + (long long)(r0 + r) * kw + w;
    uint64_t* d = dst + (p * kStageRows + r) * kStageWords + swz(r, 2 * h);
    if (al16) {
      const bool ok = row_ok && w < kw;  // kw even: w < kw implies w + 1 < kw
      cp_async16(d, ok ? src : g, ok ? 16 : 0);
    } else {
      const bool ok0 = row_ok && w < kw, ok1 = row_ok && w + 1 < kw;
      cp_async8(d, ok0 ? src : g, ok0 ? 8 : 0);
      cp_async8(d + 1, ok1 ? src + 1 : g, ok1 ? 8 : 0);
    }
  }
}

}  // namespace soniq::cuda::detail
