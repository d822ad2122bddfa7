// Shared by the CUDA mpgemm kernels: the launch parameters (built on the host from the
// small host-side desc/ksegs, passed by value so no kernel reads device metadata and no
// launch needs a host sync), the tile schedule over (row group of a x row group of b)
// pairs, and the code-sum correction + store epilogue that mirrors cpp/mpgemm.cpp.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../cpp/code_encoding.h"
#include "cuda_api.h"
#include "ptx.cuh"

namespace soniq::cuda::detail {

constexpr int kMaxGroups = 8;  // row groups per operand (one per distinct bit width)
constexpr int kMaxSegs = 8;    // K segments (one per distinct bit width along K)
constexpr int kMaxPairs = kMaxGroups * kMaxGroups;

struct OperandLayout {
  const uint64_t* data;
  const int64_t* sums;  // [rows][nsegs], device
  const int64_t* perm;  // [rows], device
  int rows;
  int ngroups;
  int is_signed;
  int max_bits;                          // over all blocks (sizes shared memory)
  int max_group_rows;
  int row_start[kMaxGroups];
  int row_count[kMaxGroups];
  int bits[kMaxGroups][kMaxSegs];
  long long offset[kMaxGroups][kMaxSegs];  // word offset of block (group, segment)
};

struct GemmParams {
  OperandLayout a, b;
  int nsegs;
  long long klen[kMaxSegs];
  long long kw[kMaxSegs];
  Scales sc;  // device pointers, any may be null
  void* out;
  int kind;   // OutKind
  // tile schedule: pair p = (pair_ga[p], pair_gb[p]) owns linear tiles
  // [tile_start[p], tile_start[p + 1]), tiles_n[p] of them per row of tiles
  int npairs;
  int tile_m, tile_n;
  int tile_start[kMaxPairs + 1];
  int tiles_n[kMaxPairs];
  unsigned char pair_ga[kMaxPairs], pair_gb[kMaxPairs];
};

// Host: validates the host-side metadata and fills everything but the tile schedule.
GemmParams make_params(const PackedOperand& a, const PackedOperand& b, const int64_t* ksegs, int64_t nsegs,
                       const Scales& sc, OutKind kind, void* out);
// Host: tiles every (group of a, group of b) pair with tile_m x tile_n; returns the tile count.
long long schedule_tiles(GemmParams& P, int tile_m, int tile_n);
// Host: throws std::runtime_error with the CUDA error text.
void check_cuda(cudaError_t e, const char* what);
// Host: raises the kernel's dynamic shared-memory limit once per device when needed.
void allow_smem(const void* kernel, int bytes);

// Launchers (one per kernel family); each checks its launch.
void launch_ref(const GemmParams& P, cudaStream_t st);
void launch_popc(GemmParams& P, cudaStream_t st);   // tiled bit-serial GEMM
void launch_gemv(GemmParams& P, cudaStream_t st);   // weight streaming, a.rows <= 16
// INT8 tensor cores (mma.sync u8.u8); int4: on u4.u4 instead when all_int4_block_pairs
void launch_mma(GemmParams& P, cudaStream_t st, bool int4);
bool all_int4_block_pairs(const GemmParams& P);  // every block of a and b has <= 4 bits
void launch_bmma(GemmParams& P, cudaStream_t st);   // binary tensor cores (mma.sync b1 and.popc)
constexpr int kGemvMaxRows = 16;

struct Tile {
  int ga, gb;
  int m0, n0;  // first row of the tile inside the group
};

__device__ __forceinline__ Tile locate_tile(const GemmParams& P, int tile) {
  int p = 0;
  while (tile >= P.tile_start[p + 1]) ++p;
  const int local = tile - P.tile_start[p];
  Tile t;
  t.ga = P.pair_ga[p];
  t.gb = P.pair_gb[p];
  t.m0 = (local / P.tiles_n[p]) * P.tile_m;
  t.n0 = (local % P.tiles_n[p]) * P.tile_n;
  return t;
}

// Per-output running total over K segments: exact int64, or float64 like the CPU driver.
template <bool kFloat>
struct Total;
template <>
struct Total<false> {
  long long v = 0;
};
template <>
struct Total<true> {
  double v = 0.0;
};

// Adds segment s of output (packed row i of a, packed row j of b) given its unsigned
// code dot product: sum_k (aa*ua + oa)(ab*ub + ob) from sum ua*ub and the code sums.
// __dmul_rn/__dadd_rn keep the float path free of FMA contraction, so the result is
// bitwise the CPU's (double(v) * segscale, accumulated in segment order).
template <bool kFloat>
__device__ __forceinline__ void add_segment(const GemmParams& P, int s, int pa, int pb, long long i, long long j,
                                            long long dot, Total<kFloat>& t) {
  const CodeEncoding ea = code_encoding(pa, P.a.is_signed), eb = code_encoding(pb, P.b.is_signed);
  const long long aa = ea.alpha, oa = ea.offset, ab = eb.alpha, ob = eb.offset;
  const int S = P.nsegs;
  const long long sa = ob ? P.a.sums[i * S + s] : 0;  // skip the loads when unused
  const long long sb = oa ? P.b.sums[j * S + s] : 0;
  const long long v = aa * ab * dot + aa * ob * sa + ab * oa * sb + P.klen[s] * oa * ob;
  if constexpr (kFloat) {
    const double ss = __dmul_rn(double(P.sc.a_seg ? P.sc.a_seg[s] : 1.0f), double(P.sc.b_seg ? P.sc.b_seg[s] : 1.0f));
    t.v = __dadd_rn(t.v, __dmul_rn(double(v), ss));
  } else {
    t.v += v;
  }
}

template <bool kFloat>
__device__ __forceinline__ void store_total(const GemmParams& P, long long i, long long j, const Total<kFloat>& t) {
  const long long m = P.a.perm[i], n = P.b.perm[j], idx = m * P.b.rows + n;
  if constexpr (kFloat) {
    double v = t.v;
    if (P.sc.a_row) v = __dmul_rn(v, double(P.sc.a_row[m]));
    if (P.sc.b_row) v = __dmul_rn(v, double(P.sc.b_row[n]));
    static_cast<float*>(P.out)[idx] = __double2float_rn(v);
  } else if (P.kind == int(OutKind::Int32)) {
    static_cast<int*>(P.out)[idx] = int(t.v);  // wraps like the CPU's int32_t(int64)
  } else {
    static_cast<long long*>(P.out)[idx] = t.v;
  }
}

__device__ __forceinline__ int popc64(unsigned long long x) { return __popcll(x); }

}  // namespace soniq::cuda::detail
