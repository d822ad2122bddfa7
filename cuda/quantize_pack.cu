// Fused activation quantize + pack on the GPU: float32 rows [M, K] -> the bit planes and
// code sums of a PackedTensor with per-K-column bits (one row group), word for word what
// cpp/actpack.cpp writes (same rounding steps, explicitly rounded: no FMA contraction).
// One warp per (row, K segment, run of kWordsPerWarp words): lane j quantizes elements j and
// j + 32 of each 64-element word, read in packed order through perm (coalesced perm reads,
// gathered x), adds Philox noise in noise mode (stochastic rounding, as the CPU); __ballot_sync assembles each plane word; lane 0 adds the word's code sum
// (popcounts of its planes) to the row's segment sum with one 64-bit atomic. Per-token
// dynamic scales come from a first kernel (one warp per row).
#include <stdexcept>
#include <string>

#include "../cpp/actpack.h"
#include "../cpp/philox.h"
#include "../cpp/rounding.h"
#include "mpgemm_common.cuh"  // kMaxSegs, check_cuda
#include "quantize_api.h"

namespace soniq::cuda {
namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWordsPerWarp = 8;

struct ActSeg : ActSegment {  // cpp/actpack.h's checked segment, plus its place in the grid
  long long warp_start;        // first warp of this segment
};

struct ActParams {
  const float* x;
  long long M, ldx, K;
  const long long* perm;  // [K] packed position -> column, device
  int nsegs;
  ActSeg seg[detail::kMaxSegs];
  long long warps;
  unsigned long long* data;
  unsigned long long* sums;  // [M][nsegs], zero on entry
  int* flags;                // bit 0: NaN in x, bit 1: perm entry outside [0, K)
  unsigned char* nan_rows;   // [M] or null: 1 where the row holds a NaN
  int noise;                 // 0 none, 1 uniform (Philox keyed by seed, as cpp/actpack.h)
  unsigned long long seed;
  float* row_scale;          // [M] or null: per-token dynamic scales (row_scale_kernel writes them)
};

// The unsigned code of t = x * inv (cpp/kernels_ref.inl ref_quant_pack): round half to even
// by (t + M) - M after clamping (cpp/rounding.h), then clamp to the level range.
__device__ __forceinline__ unsigned code_of(float t, const ActSeg& q) {
  const float M = magic<float>();
  float c;
  if (q.alpha == 1) {
    t = clampv(t, __fadd_rn(q.lo, -1.0f), __fadd_rn(q.hi, 1.0f));
    c = __fadd_rn(clampv(__fadd_rn(__fadd_rn(t, M), -M), q.lo, q.hi), -q.lo);
  } else {  // signed 1-bit: code round((t + 1) / 2) in {0, 1}
    t = clampv(__fmul_rn(__fadd_rn(t, 1.0f), 0.5f), -2.0f, 3.0f);
    c = clampv(__fadd_rn(__fadd_rn(t, M), -M), 0.0f, 1.0f);
  }
  return unsigned(c);
}

// x scaled to its grid: x * inv, or with noise x * inv + alpha * (u - 1/2) for flat index
// r * K + col (cpp/actpack.cpp noisy_values: ops.quantize's noisy value before its clamp,
// which code_of's clamps make redundant)
__device__ __forceinline__ float scaled(float x, const ActSeg& q, float inv, const ActParams& P, long long r,
                                        long long col) {
  const float t = __fmul_rn(x, inv);
  if (!P.noise) return t;
  const float u = philox::uniform_f32(P.seed, (unsigned long long)(r * P.K + col));
  return __fadd_rn(t, __fmul_rn(float(q.alpha), __fadd_rn(u, -0.5f)));
}

// Per-token dynamic mode: one warp per row takes the largest finite |x| (a max: the same in
// any order), lane 0 settles it as the CPU does (cpp/actpack.h) and stores it.
__global__ void __launch_bounds__(kThreads) row_scale_kernel(const __grid_constant__ ActParams P) {
  const long long r = blockIdx.x * (long long)(kThreads / 32) + threadIdx.x / 32;
  const int lane = int(threadIdx.x % 32);
  if (r >= P.M) return;  // warp-uniform
  const float* xr = P.x + r * P.ldx;
  int a = 0;  // the bit pattern of the largest finite |x| (cpp/actpack.h)
  for (long long k = lane; k < P.K; k += 32) {
    const int v = finite_abs_bits(xr[k]);
    a = v > a ? v : a;
  }
  for (int o = 16; o > 0; o >>= 1) {
    const int b = __shfl_xor_sync(0xffffffffu, a, o);
    a = b > a ? b : a;
  }
  if (lane == 0) P.row_scale[r] = settle_row_scale(float_of_bits(a), P.seg, P.nsegs);
}

__global__ void __launch_bounds__(kThreads) quantize_pack_kernel(const __grid_constant__ ActParams P) {
  const long long warp = blockIdx.x * (long long)(kThreads / 32) + threadIdx.x / 32;
  const int lane = int(threadIdx.x % 32);
  if (warp >= P.warps) return;  // warp-uniform: whole warps leave together
  int s = 0;
  while (s + 1 < P.nsegs && warp >= P.seg[s + 1].warp_start) ++s;
  const ActSeg& q = P.seg[s];
  const long long runs = (q.kw + kWordsPerWarp - 1) / kWordsPerWarp, local = warp - q.warp_start;
  const long long r = local / runs, w0 = (local % runs) * kWordsPerWarp;
  const long long w1 = w0 + kWordsPerWarp < q.kw ? w0 + kWordsPerWarp : q.kw;
  const float* xr = P.x + r * P.ldx;
  const float inv = P.row_scale ? dynamic_inv(q, P.row_scale[r]) : q.inv;
  const long long* perm = P.perm + q.k0;
  unsigned long long* out = P.data + P.M * q.word_off + r * q.kw;
  const long long plane_stride = P.M * q.kw;
  int flags = 0;
  unsigned long long sum = 0;
  for (long long w = w0; w < w1; ++w) {
    unsigned c[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const long long j = w * 64 + h * 32 + lane;
      c[h] = 0;  // padding past klen: code 0 in every encoding
      if (j < q.klen) {
        const long long col = perm[j];
        if ((unsigned long long)col >= (unsigned long long)P.K) {
          flags |= 2;
        } else {
          const float v = xr[col];
          if (v != v) flags |= 1;  // NaN: no code (the host raises)
          else c[h] = code_of(scaled(v, q, inv, P, r, col), q);
        }
      }
    }
    for (int p = 0; p < q.bits; ++p) {  // q.bits is warp-uniform
      const unsigned lo = __ballot_sync(0xffffffffu, (c[0] >> p) & 1u);
      const unsigned hi = __ballot_sync(0xffffffffu, (c[1] >> p) & 1u);
      const unsigned long long word = (unsigned long long)hi << 32 | lo;
      if (lane == 0) {
        out[p * plane_stride + w] = word;
        sum += (unsigned long long)__popcll(word) << p;
      }
    }
  }
  if (lane == 0) atomicAdd(P.sums + r * P.nsegs + s, sum);
  if (flags) atomicOr(P.flags, flags);
  if ((flags & 1) && P.nan_rows) P.nan_rows[r] = 1;  // the same value from every writer
}

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument("quantize_pack: " + msg); }

}  // namespace

void quantize_pack(const float* x, int64_t M, int64_t ldx, const int64_t* perm, int64_t K, int64_t nsegs,
                   const int64_t* segs, const float* seg_scale, bool is_signed, uint64_t* data, int64_t* sums,
                   int* flags, unsigned char* nan_rows, ActNoise noise, void* stream, float* row_scale) {
  if (M <= 0 || K <= 0 || !x || !perm || !data || !sums || !flags) bad("x must be non-empty");
  if (noise.mode != 0 && noise.mode != 1) bad("noise must be 0 (none) or 1 (uniform)");
  if (nsegs <= 0 || nsegs > detail::kMaxSegs)
    bad("the CUDA kernel takes 1.." + std::to_string(detail::kMaxSegs) + " K segments, got " + std::to_string(nsegs));
  // host metadata, checked as for the CPU kernel (perm is on the device: the kernel checks it)
  const std::vector<ActSegment> plan = act_segments(ActLayout{K, nullptr, nsegs, segs, seg_scale}, is_signed);
  ActParams P{};
  P.x = x;
  P.M = M;
  P.ldx = ldx;
  P.K = K;
  P.perm = reinterpret_cast<const long long*>(perm);
  P.nsegs = int(nsegs);
  P.data = reinterpret_cast<unsigned long long*>(data);
  P.sums = reinterpret_cast<unsigned long long*>(sums);
  P.flags = flags;
  P.nan_rows = nan_rows;
  P.noise = noise.mode;
  P.seed = noise.seed;
  P.row_scale = row_scale;
  long long warps = 0;
  for (int64_t s = 0; s < nsegs; ++s) {
    P.seg[s] = ActSeg{plan[size_t(s)], warps};
    warps += M * ((plan[size_t(s)].kw + kWordsPerWarp - 1) / kWordsPerWarp);
  }
  P.warps = warps;
  const long long blocks = (warps + kThreads / 32 - 1) / (kThreads / 32);
  if (blocks > 2147483647LL) bad("too many rows for one launch");
  if (row_scale) {  // the scales first (same stream: the pack kernel reads them)
    SONIQ_LAUNCH(dim3(unsigned((M + kThreads / 32 - 1) / (kThreads / 32))), dim3(kThreads), 0,
                 static_cast<cudaStream_t>(stream), row_scale_kernel)(P);
    detail::check_cuda(cudaGetLastError(), "soniq quantize_pack row-scale kernel launch");
  }
  SONIQ_LAUNCH(dim3(unsigned(blocks)), dim3(kThreads), 0, static_cast<cudaStream_t>(stream), quantize_pack_kernel)(P);
  detail::check_cuda(cudaGetLastError(), "soniq quantize_pack kernel launch");
}

}  // namespace soniq::cuda
