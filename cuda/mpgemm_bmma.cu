// Binary tensor-core mpgemm: the bit-serial sum over plane pairs,
//   sum_p sum_q 2^(p+q) popcount(A_p & B_q),
// with each popcount block done by mma.sync.m16n8k256 .b1 .and.popc (sm_80+, also
// accepted for sm_90). The packed planes ARE the b1 fragments: a 32-bit word of a plane
// row holds 32 consecutive K bits, so no expansion is needed. Staging as the popcount
// GEMM (cp.async, 3 stages); per chunk of 256 K each (p, q) product goes through a zero
// accumulator and is shifted into an int32 sum, flushed to 64 bits every 16384 K.
// Whether this beats the INT8 path depends on the chip's b1 tensor throughput: measure.
#include <stdexcept>

#include "plane_stage.cuh"

namespace soniq::cuda::detail {
namespace {

constexpr int kTile = kStageRows;   // 64 x 64 outputs per block
constexpr int kThreads = 256;       // 8 warps, 2 x 4, each 32 x 16 outputs
constexpr int kStages = 3;
constexpr int kFlushChunks = 64;    // 64 * 256 K = 16384 K: 16384 * 255^2 < 2^31

// 32-bit word t32 (0..7, i.e. K bits 32*t32 .. +31 of the chunk) of a staged plane row.
__device__ __forceinline__ unsigned word32(const uint64_t* stage, int plane, int r, int t32) {
  const uint64_t* row = stage + (plane * kStageRows + r) * kStageWords;
  return reinterpret_cast<const unsigned*>(row + swz(r, t32 >> 1))[t32 & 1];
}

template <bool kFloat>
__global__ void __launch_bounds__(kThreads) bmma_gemm_kernel(const __grid_constant__ GemmParams P) {
  SONIQ_DYNAMIC_SMEM(uint64_t, smem);
  const Tile T = locate_tile(P, blockIdx.x);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int wm = (warp / 4) * 32, wn = (warp % 4) * 16;
  const int rows_a = P.a.row_count[T.ga], rows_b = P.b.row_count[T.gb];
  const int stage_a = P.a.max_bits * kTile * kStageWords, stage_b = P.b.max_bits * kTile * kStageWords;
  uint64_t* sA = smem;
  uint64_t* sB = smem + kStages * stage_a;

  Total<kFloat> total[2][2][4];
  for (int s = 0; s < P.nsegs; ++s) {
    const int pa = P.a.bits[T.ga][s], pb = P.b.bits[T.gb][s];
    const long long kw = P.kw[s];
    const uint64_t* gA = P.a.data + P.a.offset[T.ga][s];
    const uint64_t* gB = P.b.data + P.b.offset[T.gb][s];
    const long long stride_a = rows_a * kw, stride_b = rows_b * kw;
    const bool al_a = aligned16(gA, kw), al_b = aligned16(gB, kw);
    const int nchunks = int((kw + kStageWords - 1) / kStageWords);
    auto issue = [&](int c) {
      const int st = c % kStages;
      stage_planes<kThreads>(sA + st * stage_a, gA, stride_a, rows_a, T.m0, kw, c, pa, al_a, tid);
      stage_planes<kThreads>(sB + st * stage_b, gB, stride_b, rows_b, T.n0, kw, c, pb, al_b, tid);
    };

    int acc[2][2][4];
    long long dot[2][2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0, dot[i][j][e] = 0;

    for (int c = 0; c < kStages - 1; ++c) {
      if (c < nchunks) issue(c);
      cp_async_commit();
    }
    for (int c = 0; c < nchunks; ++c) {
      if (c + kStages - 1 < nchunks) issue(c + kStages - 1);
      cp_async_commit();
      cp_async_wait<kStages - 1>();
      __syncthreads();
      const uint64_t* cA = sA + (c % kStages) * stage_a;
      const uint64_t* cB = sB + (c % kStages) * stage_b;
      for (int p = 0; p < pa; ++p) {
        unsigned af[2][4];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int r = wm + 16 * i + g;
          af[i][0] = word32(cA, p, r, t);
          af[i][1] = word32(cA, p, r + 8, t);
          af[i][2] = word32(cA, p, r, t + 4);
          af[i][3] = word32(cA, p, r + 8, t + 4);
        }
        for (int q = 0; q < pb; ++q) {
          const int sh = p + q;
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int r = wn + 8 * j + g;
            const unsigned b0 = word32(cB, q, r, t), b1 = word32(cB, q, r, t + 4);
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              int d[4];
              mma_b1_m16n8k256(d, af[i][0], af[i][1], af[i][2], af[i][3], b0, b1);
#pragma unroll
              for (int e = 0; e < 4; ++e) acc[i][j][e] += d[e] << sh;
            }
          }
        }
      }
      if ((c + 1) % kFlushChunks == 0) {
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) dot[i][j][e] += acc[i][j][e], acc[i][j][e] = 0;
      }
      __syncthreads();  // this stage is refilled by the next iteration's issue
    }

#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int mi = T.m0 + wm + 16 * i + g + (e >= 2 ? 8 : 0);
          const int nj = T.n0 + wn + 8 * j + 2 * t + (e & 1);
          if (mi < rows_a && nj < rows_b)
            add_segment<kFloat>(P, s, pa, pb, P.a.row_start[T.ga] + mi, P.b.row_start[T.gb] + nj,
                                dot[i][j][e] + acc[i][j][e], total[i][j][e]);
        }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int mi = T.m0 + wm + 16 * i + g + (e >= 2 ? 8 : 0);
        const int nj = T.n0 + wn + 8 * j + 2 * t + (e & 1);
        if (mi < rows_a && nj < rows_b)
          store_total<kFloat>(P, P.a.row_start[T.ga] + mi, P.b.row_start[T.gb] + nj, total[i][j][e]);
      }
}

}  // namespace

void launch_bmma(GemmParams& P, cudaStream_t st) {
  const long long tiles = schedule_tiles(P, kTile, kTile);
  const int smem = kStages * (P.a.max_bits + P.b.max_bits) * kTile * kStageWords * 8;
  const dim3 grid{unsigned(tiles)}, block{unsigned(kThreads)};
  if (P.kind == int(OutKind::Float32)) {
    allow_smem(reinterpret_cast<const void*>(bmma_gemm_kernel<true>), smem);
    SONIQ_LAUNCH(grid, block, smem, st, bmma_gemm_kernel<true>)(P);
  } else {
    allow_smem(reinterpret_cast<const void*>(bmma_gemm_kernel<false>), smem);
    SONIQ_LAUNCH(grid, block, smem, st, bmma_gemm_kernel<false>)(P);
  }
  check_cuda(cudaGetLastError(), "soniq bmma_gemm kernel launch");
}

}  // namespace soniq::cuda::detail
