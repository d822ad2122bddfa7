// Vector-unit (popcount) bit-serial mpgemm kernels over the packed bit planes:
//   out_block = sum_p sum_q 2^(p+q) popcount(A_p & B_q), then the code-sum corrections.
// * popc_gemm: 64x64 output tile per 256-thread block, 4x4 outputs per thread; A and B
//   planes staged in shared memory by cp.async (16-byte copies when the block is
//   16-byte aligned, 8-byte otherwise), 3 stages deep so several chunks are in flight.
// * gemv: a.rows <= 16 (GEMV / small batch). Streams the packed weights (b) once at
//   full width: every lane loads 16 bytes per plane and row, a warp reads 512 contiguous
//   bytes; the small activation chunk is shared through shared memory.
// Exactness first; tile sizes are first guesses to be tuned with bench/gpu_gemm.py.
#include <stdexcept>

#include "plane_stage.cuh"

namespace soniq::cuda::detail {
namespace {

// ---- tiled GEMM ----------------------------------------------------------------------------
constexpr int kTile = kStageRows;
constexpr int kChunk = kStageWords;
constexpr int kThreads = 256;
constexpr int kStages = 3;

template <bool kFloat>
__global__ void __launch_bounds__(kThreads) popc_gemm_kernel(const __grid_constant__ GemmParams P) {
  SONIQ_DYNAMIC_SMEM(uint64_t, smem);
  const Tile T = locate_tile(P, blockIdx.x);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int rows_a = P.a.row_count[T.ga], rows_b = P.b.row_count[T.gb];
  const int stage_a = P.a.max_bits * kTile * kChunk, stage_b = P.b.max_bits * kTile * kChunk;
  uint64_t* sA = smem;
  uint64_t* sB = smem + kStages * stage_a;

  Total<kFloat> total[4][4];
  for (int s = 0; s < P.nsegs; ++s) {
    const int pa = P.a.bits[T.ga][s], pb = P.b.bits[T.gb][s];
    const long long kw = P.kw[s];
    const uint64_t* gA = P.a.data + P.a.offset[T.ga][s];
    const uint64_t* gB = P.b.data + P.b.offset[T.gb][s];
    const long long stride_a = rows_a * kw, stride_b = rows_b * kw;
    const bool al_a = aligned16(gA, kw), al_b = aligned16(gB, kw);
    const int nchunks = int((kw + kChunk - 1) / kChunk);
    auto issue = [&](int c) {
      const int st = c % kStages;
      stage_planes<kThreads>(sA + st * stage_a, gA, stride_a, rows_a, T.m0, kw, c, pa, al_a, tid);
      stage_planes<kThreads>(sB + st * stage_b, gB, stride_b, rows_b, T.n0, kw, c, pb, al_b, tid);
    };

    long long dot[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) dot[i][j] = 0;

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
      int part[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) part[i][j] = 0;
      for (int p = 0; p < pa; ++p) {
        ulonglong2 a[4][2];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = ty + 16 * i;
          const uint64_t* row = cA + (p * kTile + r) * kChunk;
          a[i][0] = *reinterpret_cast<const ulonglong2*>(row + swz(r, 0));
          a[i][1] = *reinterpret_cast<const ulonglong2*>(row + swz(r, 2));
        }
        for (int q = 0; q < pb; ++q) {
          const int sh = p + q;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int r = tx + 16 * j;
            const uint64_t* row = cB + (q * kTile + r) * kChunk;
            const ulonglong2 b0 = *reinterpret_cast<const ulonglong2*>(row + swz(r, 0));
            const ulonglong2 b1 = *reinterpret_cast<const ulonglong2*>(row + swz(r, 2));
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              // <= 256 per chunk, shifted by <= 14, summed over <= 64 plane pairs: fits int32
              const int cnt = popc64(a[i][0].x & b0.x) + popc64(a[i][0].y & b0.y) + popc64(a[i][1].x & b1.x) +
                              popc64(a[i][1].y & b1.y);
              part[i][j] += cnt << sh;
            }
          }
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) dot[i][j] += part[i][j];
      __syncthreads();  // this stage is refilled by the next iteration's issue
    }

#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int mi = T.m0 + ty + 16 * i, nj = T.n0 + tx + 16 * j;
        if (mi < rows_a && nj < rows_b)
          add_segment<kFloat>(P, s, pa, pb, P.a.row_start[T.ga] + mi, P.b.row_start[T.gb] + nj, dot[i][j], total[i][j]);
      }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int mi = T.m0 + ty + 16 * i, nj = T.n0 + tx + 16 * j;
      if (mi < rows_a && nj < rows_b)
        store_total<kFloat>(P, P.a.row_start[T.ga] + mi, P.b.row_start[T.gb] + nj, total[i][j]);
    }
}

// ---- GEMV / small M --------------------------------------------------------------------------
constexpr int kGemvThreads = 256;  // 8 warps
constexpr int kGemvChunk = 64;     // words of K per chunk: 2 per lane
constexpr int kGemvPlanes = 4;     // weight planes loaded at once (all of them for <= 4 bits)

__device__ __forceinline__ long long warp_sum(long long v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// MB: rows of a handled (>= every row group of a); RW: rows of b per warp.
template <int MB, int RW, bool kFloat>
__global__ void __launch_bounds__(kGemvThreads, MB <= 2 ? 2 : 1) gemv_kernel(const __grid_constant__ GemmParams P) {
  SONIQ_DYNAMIC_SMEM(uint64_t, smem);  // a chunk: [pa][MB][kGemvChunk] words
  const Tile T = locate_tile(P, blockIdx.x);        // tile_m = MB so T.m0 == 0
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rows_a = P.a.row_count[T.ga], rows_b = P.b.row_count[T.gb];
  const int nb0 = T.n0 + warp * RW;
  const int my_r = lane / MB, my_m = lane % MB;  // the output this lane owns (lane < RW*MB)
  const bool owner = lane < RW * MB && my_m < rows_a && nb0 + my_r < rows_b;
  const long long my_i = P.a.row_start[T.ga] + my_m, my_j = P.b.row_start[T.gb] + nb0 + my_r;

  Total<kFloat> mine;
  for (int s = 0; s < P.nsegs; ++s) {
    const int pa = P.a.bits[T.ga][s], pb = P.b.bits[T.gb][s];
    const long long kw = P.kw[s];
    const uint64_t* gA = P.a.data + P.a.offset[T.ga][s];
    const uint64_t* gB = P.b.data + P.b.offset[T.gb][s];
    const long long stride_a = rows_a * kw, stride_b = rows_b * kw;
    const bool al_b = aligned16(gB, kw);

    long long acc[RW][MB];
#pragma unroll
    for (int r = 0; r < RW; ++r)
#pragma unroll
      for (int m = 0; m < MB; ++m) acc[r][m] = 0;

    for (long long c0 = 0; c0 < kw; c0 += kGemvChunk) {
      const long long w = c0 + 2 * lane;
      // Weight words of up to kGemvPlanes planes x RW rows, all in flight at once; the
      // first batch is issued before the activation chunk is staged, hiding that too.
      ulonglong2 bv[kGemvPlanes][RW];
      auto load_b = [&](int q0) {
#pragma unroll
        for (int qq = 0; qq < kGemvPlanes; ++qq)
#pragma unroll
          for (int r = 0; r < RW; ++r) {
            const int q = q0 + qq;
            const bool ok = q < pb && nb0 + r < rows_b;
            const uint64_t* src = gB + (long long)(ok ? q : 0) * stride_b + (long long)(nb0 + r) * kw + w;
            if (al_b) {
              bv[qq][r] = (ok && w < kw) ? __ldg(reinterpret_cast<const ulonglong2*>(src)) : make_ulonglong2(0, 0);
            } else {
              bv[qq][r].x = (ok && w < kw) ? __ldg(src) : 0ull;
              bv[qq][r].y = (ok && w + 1 < kw) ? __ldg(src + 1) : 0ull;
            }
          }
      };
      load_b(0);
      __syncthreads();  // previous chunk fully read
      const int units = pa * MB * kGemvChunk;
      for (int u = threadIdx.x; u < units; u += kGemvThreads) {
        const int p = u / (MB * kGemvChunk), m = (u / kGemvChunk) % MB, wu = u % kGemvChunk;
        smem[u] = (m < rows_a && c0 + wu < kw) ? __ldg(gA + p * stride_a + m * kw + c0 + wu) : 0ull;
      }
      __syncthreads();
      for (int q0 = 0; q0 < pb; q0 += kGemvPlanes) {
        if (q0 > 0) load_b(q0);
        for (int p = 0; p < pa; ++p) {
#pragma unroll
          for (int m = 0; m < MB; ++m) {
            const ulonglong2 av = *reinterpret_cast<const ulonglong2*>(smem + (p * MB + m) * kGemvChunk + 2 * lane);
#pragma unroll
            for (int qq = 0; qq < kGemvPlanes; ++qq) {
              // planes past pb were loaded as zeros: they add nothing
              const int sh = p + q0 + qq;
#pragma unroll
              for (int r = 0; r < RW; ++r)
                acc[r][m] += (long long)((popc64(av.x & bv[qq][r].x) + popc64(av.y & bv[qq][r].y)) << sh);
            }
          }
        }
      }
    }

    long long dot = 0;
#pragma unroll
    for (int r = 0; r < RW; ++r)
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        const long long v = warp_sum(acc[r][m]);
        if (lane == r * MB + m) dot = v;
      }
    if (owner) add_segment<kFloat>(P, s, pa, pb, my_i, my_j, dot, mine);
  }
  if (owner) store_total<kFloat>(P, my_i, my_j, mine);
}

template <int MB, int RW>
void launch_gemv_mb(GemmParams& P, cudaStream_t st) {
  const long long tiles = schedule_tiles(P, MB, (kGemvThreads / 32) * RW);
  const int smem = P.a.max_bits * MB * kGemvChunk * 8;
  const dim3 grid{unsigned(tiles)}, block{unsigned(kGemvThreads)};
  if (P.kind == int(OutKind::Float32)) {
    allow_smem(reinterpret_cast<const void*>(gemv_kernel<MB, RW, true>), smem);
    SONIQ_LAUNCH(grid, block, smem, st, gemv_kernel<MB, RW, true>)(P);
  } else {
    allow_smem(reinterpret_cast<const void*>(gemv_kernel<MB, RW, false>), smem);
    SONIQ_LAUNCH(grid, block, smem, st, gemv_kernel<MB, RW, false>)(P);
  }
  check_cuda(cudaGetLastError(), "soniq gemv kernel launch");
}

}  // namespace

void launch_popc(GemmParams& P, cudaStream_t st) {
  const long long tiles = schedule_tiles(P, kTile, kTile);
  const int smem = kStages * (P.a.max_bits + P.b.max_bits) * kTile * kChunk * 8;
  const dim3 grid{unsigned(tiles)}, block{unsigned(kThreads)};
  if (P.kind == int(OutKind::Float32)) {
    allow_smem(reinterpret_cast<const void*>(popc_gemm_kernel<true>), smem);
    SONIQ_LAUNCH(grid, block, smem, st, popc_gemm_kernel<true>)(P);
  } else {
    allow_smem(reinterpret_cast<const void*>(popc_gemm_kernel<false>), smem);
    SONIQ_LAUNCH(grid, block, smem, st, popc_gemm_kernel<false>)(P);
  }
  check_cuda(cudaGetLastError(), "soniq popc_gemm kernel launch");
}

void launch_gemv(GemmParams& P, cudaStream_t st) {
  const int m = P.a.max_group_rows;
  if (m <= 1) launch_gemv_mb<1, 2>(P, st);
  else if (m <= 2) launch_gemv_mb<2, 2>(P, st);
  else if (m <= 4) launch_gemv_mb<4, 2>(P, st);
  else if (m <= 8) launch_gemv_mb<8, 2>(P, st);
  else if (m <= kGemvMaxRows) launch_gemv_mb<16, 2>(P, st);
  else throw std::invalid_argument("gemv kernel: every row group of a must have at most 16 rows");
}

}  // namespace soniq::cuda::detail
