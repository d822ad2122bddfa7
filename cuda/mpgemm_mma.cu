// Tensor-core mpgemm: the bit planes of a 64x64 tile are expanded to one unsigned code per
// element in shared memory and multiplied by mma.sync: a byte per code and
// m16n8k32 .u8 x .u8 -> .s32 (sm_80 and sm_90 alike), or, in the INT4 variant ("mma4"), a
// nibble per code and m16n8k64 .u4 x .u4 -> .s32 when every block pair of the call has
// <= 4 x <= 4 bits (sm_80-89 have INT4 tensor cores at twice the INT8 rate; sm_90 accepts
// the instruction but has no INT4 units, so "auto" uses it on 8.x only). Why unsigned x unsigned: codes
// are 0..2^b-1 <= 255, which .s8 cannot hold for 8 bits; the signed encodings are
// recovered exactly afterwards by the same code-sum corrections as every other kernel
// (design.md sec. 2):
//   sum_k va*vb = aa*ab*sum_k ua*ub + aa*ob*sum ua + ab*oa*sum ub + K*oa*ob.
// The .s32 accumulators wrap past 2^31, so they are flushed to 64 bits every
// kFlushChunks chunks (16384 K: 16384 * 255 * 255 < 2^31).
// Exactness first: plain global loads with the next chunk in flight during the mma of
// the current one, two shared stages. Faster paths (ldmatrix, INT8 byte layout from the
// packer for 8-bit operands, wgmma on sm_90a) are left for measurement.
#include <stdexcept>

#include "mpgemm_common.cuh"

namespace soniq::cuda::detail {
namespace {

constexpr int kThreads = 128;   // 4 warps
constexpr int kFlushChunks = 128;   // u8: 128 chunks * 128 K = 16384 K (u4: 32768 K, * 15^2 < 2^31)

// Shared-memory layout of a chunk of CB-bit codes (CB = 8: bytes, 4: nibbles, low K
// first): 128 bytes of codes per row either way -- 128 K (2 plane words) as bytes, 256 K
// (4 words) as nibbles -- so both widths use the same stages, 4 mma steps per chunk and
// one barrier per 4 steps.
template <int CB>
struct CodeLayout {
  static constexpr int kWords = 16 / CB;                // plane words per row and chunk
  static constexpr int kWordBytes = 64 * CB / 8;        // one 64-code plane word, expanded
  // padded rows (144 bytes = 36 banks, 4 mod 32): the fragment reads of 8 rows x 4 lanes
  // and the 16-byte stores of 8 consecutive units (2 rows x 4 words, or 4 rows x 2
  // words) each touch 32 distinct banks
  static constexpr int kRowBytes = 128 + 16;
  static constexpr int kSteps = 128 / 32;               // mma per chunk: 32 bytes of K each
};

// 4 bits -> 4 bytes holding 0/1 (bit i to byte i): the multiply places copies of the
// nibble at shifts 0, 7, 14, 21 without overlap, the mask keeps bit i of copy i.
__device__ __forceinline__ unsigned spread4(unsigned nib) { return (nib * 0x00204081u) & 0x01010101u; }
// 8 bits -> 8 nibbles holding 0/1 (bit i to bit 4i), by three shift-and-mask steps.
__device__ __forceinline__ unsigned spread8(unsigned byte) {
  unsigned x = (byte | (byte << 12)) & 0x000F000Fu;
  x = (x | (x << 6)) & 0x03030303u;
  return (x | (x << 3)) & 0x11111111u;
}

// Loads the plane words of one (row, word) for every plane (zeros outside the block).
template <int NP>
__device__ __forceinline__ void load_planes(uint64_t (&x)[NP], const uint64_t* g, long long plane_stride, int planes,
                                            bool ok) {
#pragma unroll
  for (int p = 0; p < NP; ++p) x[p] = (ok && p < planes) ? __ldg(g + p * plane_stride) : 0ull;
}

// Writes the 64 codes of one plane word set: code k = sum_p bit_k(x_p) << p, as bytes
// (CB = 8 planes; 4 plane bits spread per output word) or nibbles (CB = 4; 8 bits spread).
template <int CB>
__device__ __forceinline__ void expand_store(unsigned char* dst, const uint64_t (&x)[CB]) {
  constexpr int G = 32 / CB, W = 2 * CB;  // plane bits per 32-bit output word, output words
  unsigned out[W];
#pragma unroll
  for (int j = 0; j < W; ++j) out[j] = 0;
#pragma unroll
  for (int p = 0; p < CB; ++p) {
    const unsigned lo = unsigned(x[p]), hi = unsigned(x[p] >> 32), mask = (1u << G) - 1;
#pragma unroll
    for (int j = 0; j < W / 2; ++j) {
      out[j] |= (CB == 8 ? spread4((lo >> (G * j)) & mask) : spread8((lo >> (G * j)) & mask)) << p;
      out[W / 2 + j] |= (CB == 8 ? spread4((hi >> (G * j)) & mask) : spread8((hi >> (G * j)) & mask)) << p;
    }
  }
  uint4* d = reinterpret_cast<uint4*>(dst);
#pragma unroll
  for (int v = 0; v < W / 4; ++v) d[v] = make_uint4(out[4 * v], out[4 * v + 1], out[4 * v + 2], out[4 * v + 3]);
}

// The plane words one thread expands for a tile operand of ROWS rows: units
// u = tid + k * kThreads, each one (row u / W, word u % W) of the W-word chunk (W = 2 for
// bytes, 4 for nibbles: the same registers, 8 plane words per unit of 64-row tiles).
template <int ROWS, int CB>
struct Expander {
  static constexpr int W = CodeLayout<CB>::kWords;
  static constexpr int kUnits = (ROWS * W + kThreads - 1) / kThreads;
  uint64_t x[kUnits][CB];
  const uint64_t* g[kUnits];
  bool unit_ok[kUnits], row_ok[kUnits];
  int word[kUnits], soff[kUnits];

  __device__ __forceinline__ void init(const uint64_t* block, long long kw, int r0, int rows, int tid) {
#pragma unroll
    for (int k = 0; k < kUnits; ++k) {
      const int u = tid + k * kThreads, r = u / W;
      unit_ok[k] = u < ROWS * W;
      row_ok[k] = unit_ok[k] && r0 + r < rows;
      word[k] = u % W;
      g[k] = block + (long long)(r0 + (row_ok[k] ? r : 0)) * kw + word[k];
      soff[k] = (unit_ok[k] ? r : 0) * CodeLayout<CB>::kRowBytes + word[k] * CodeLayout<CB>::kWordBytes;
    }
  }
  __device__ __forceinline__ void load(int c, long long kw, long long stride, int planes) {
#pragma unroll
    for (int k = 0; k < kUnits; ++k)
      load_planes(x[k], g[k] + (long long)W * c, stride, planes, row_ok[k] && (long long)W * c + word[k] < kw);
  }
  __device__ __forceinline__ void store(unsigned char* stage) const {
#pragma unroll
    for (int k = 0; k < kUnits; ++k)
      if (unit_ok[k]) expand_store(stage + soff[k], x[k]);
  }
};

template <int CB>
__device__ __forceinline__ void mma_codes(int (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  if constexpr (CB == 8) mma_u8_m16n8k32(c, a[0], a[1], a[2], a[3], b[0], b[1]);
  else mma_u4_m16n8k64(c, a[0], a[1], a[2], a[3], b[0], b[1]);
}

// The tile geometry: TM = 64: 64 x 64 tile, warps 2 x 2 of 32 x 32. TM = 16 (small M):
// 16 x 128 tile, warps 1 x 4 of 16 x 32, so a GEMV-sized a wastes no tensor-core rows.
template <int TM>
struct TileShape {
  static constexpr int TN = TM == 16 ? 128 : 64;
  static constexpr int WARPS_N = TN / 32, WM = TM / (4 / WARPS_N), MI = WM / 16, NJ = 4;
  static constexpr int kStageA = TM * CodeLayout<8>::kRowBytes;  // the same for nibbles
  static constexpr int kStageB = TN * CodeLayout<8>::kRowBytes;
  static_assert(MI >= 1 && (4 / WARPS_N) * WM == TM, "tile shape");
  static_assert(CodeLayout<8>::kRowBytes == CodeLayout<4>::kRowBytes, "one stage size for both code widths");
};

// The code dot products of one K segment for this thread's fragments, in CB-bit codes:
// acc gathers up to kFlushChunks chunks, then flush() moves it to 64 bits and clears it.
template <int CB, int TM, class Flush>
__device__ __forceinline__ void segment_mma(const GemmParams& P, const Tile& T, int s, int pa, int pb,
                                            unsigned char* sA, unsigned char* sB, int wm, int wn,
                                            int (&acc)[TileShape<TM>::MI][4][4], Flush& flush) {
  using S = TileShape<TM>;
  using L = CodeLayout<CB>;
  const int tid = threadIdx.x, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int rows_a = P.a.row_count[T.ga], rows_b = P.b.row_count[T.gb];
  const long long kw = P.kw[s];
  const long long stride_a = rows_a * kw, stride_b = rows_b * kw;
  Expander<TM, CB> ea;
  Expander<S::TN, CB> eb;
  ea.init(P.a.data + P.a.offset[T.ga][s], kw, T.m0, rows_a, tid);
  eb.init(P.b.data + P.b.offset[T.gb][s], kw, T.n0, rows_b, tid);
  const int nchunks = int((kw + L::kWords - 1) / L::kWords);

  ea.load(0, kw, stride_a, pa);
  eb.load(0, kw, stride_b, pb);
  ea.store(sA);
  eb.store(sB);
  __syncthreads();
  for (int c = 0; c < nchunks; ++c) {
    const int cur = c & 1;
    const bool more = c + 1 < nchunks;
    if (more) {  // next chunk's words in flight during this chunk's mma
      ea.load(c + 1, kw, stride_a, pa);
      eb.load(c + 1, kw, stride_b, pb);
    }
    const unsigned char* A = sA + cur * S::kStageA;
    const unsigned char* B = sB + cur * S::kStageB;
#pragma unroll
    for (int ks = 0; ks < L::kSteps; ++ks) {
      const int k0 = ks * 32 + t * 4;  // byte offset: 4 codes (u8) or 8 codes (u4) per register
      unsigned af[S::MI][4], bf[S::NJ][2];
#pragma unroll
      for (int i = 0; i < S::MI; ++i) {
        const unsigned char* r0 = A + (wm + 16 * i + g) * L::kRowBytes + k0;
        const unsigned char* r8 = r0 + 8 * L::kRowBytes;
        af[i][0] = *reinterpret_cast<const unsigned*>(r0);
        af[i][1] = *reinterpret_cast<const unsigned*>(r8);
        af[i][2] = *reinterpret_cast<const unsigned*>(r0 + 16);
        af[i][3] = *reinterpret_cast<const unsigned*>(r8 + 16);
      }
#pragma unroll
      for (int j = 0; j < S::NJ; ++j) {
        const unsigned char* r = B + (wn + 8 * j + g) * L::kRowBytes + k0;
        bf[j][0] = *reinterpret_cast<const unsigned*>(r);
        bf[j][1] = *reinterpret_cast<const unsigned*>(r + 16);
      }
#pragma unroll
      for (int i = 0; i < S::MI; ++i)
#pragma unroll
        for (int j = 0; j < S::NJ; ++j) mma_codes<CB>(acc[i][j], af[i], bf[j]);
    }
    if (more) {
      ea.store(sA + (cur ^ 1) * S::kStageA);
      eb.store(sB + (cur ^ 1) * S::kStageB);
    }
    if ((c + 1) % kFlushChunks == 0) flush();
    __syncthreads();  // the other stage is complete; this one is free for the next chunk
  }
  flush();
}

// CB: the code width of every block pair of the launch (4 only when all have <= 4 x <= 4
// bits: one code width per kernel keeps it within 255 registers without spills).
template <int TM, bool kFloat, int CB>
__global__ void __launch_bounds__(kThreads, 1) mma_gemm_kernel(const __grid_constant__ GemmParams P) {
  using S = TileShape<TM>;
  constexpr int MI = S::MI, NJ = S::NJ;
  __shared__ __align__(16) unsigned char sA[2 * S::kStageA];
  __shared__ __align__(16) unsigned char sB[2 * S::kStageB];
  const Tile T = locate_tile(P, blockIdx.x);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;                                     // mma fragment coordinates
  const int wm = (warp / S::WARPS_N) * S::WM, wn = (warp % S::WARPS_N) * 32;  // warp's output sub-tile
  const int rows_a = P.a.row_count[T.ga], rows_b = P.b.row_count[T.gb];

  Total<kFloat> total[MI][NJ][4];
  for (int s = 0; s < P.nsegs; ++s) {
    const int pa = P.a.bits[T.ga][s], pb = P.b.bits[T.gb][s];
    const long long aab = code_encoding(pa, P.a.is_signed).alpha * code_encoding(pb, P.b.is_signed).alpha;

    int acc[MI][NJ][4];
    long long dot[MI][NJ][4];  // only the float path keeps the raw dot (one rounding per segment)
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < NJ; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0, dot[i][j][e] = 0;
    auto flush = [&]() {
#pragma unroll
      for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if constexpr (kFloat) dot[i][j][e] += acc[i][j][e];
            else total[i][j][e].v += aab * (long long)acc[i][j][e];
            acc[i][j][e] = 0;
          }
    };
    segment_mma<CB, TM>(P, T, s, pa, pb, sA, sB, wm, wn, acc, flush);

#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < NJ; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int mi = T.m0 + wm + 16 * i + g + (e >= 2 ? 8 : 0);
          const int nj = T.n0 + wn + 8 * j + 2 * t + (e & 1);
          if (mi < rows_a && nj < rows_b) {
            const long long ii = P.a.row_start[T.ga] + mi, jj = P.b.row_start[T.gb] + nj;
            // int path: the dot is already in the total, add only the corrections
            add_segment<kFloat>(P, s, pa, pb, ii, jj, kFloat ? dot[i][j][e] : 0, total[i][j][e]);
          }
        }
  }
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int mi = T.m0 + wm + 16 * i + g + (e >= 2 ? 8 : 0);
        const int nj = T.n0 + wn + 8 * j + 2 * t + (e & 1);
        if (mi < rows_a && nj < rows_b)
          store_total<kFloat>(P, P.a.row_start[T.ga] + mi, P.b.row_start[T.gb] + nj, total[i][j][e]);
      }
}

template <int TM, int CB>
void launch_mma_tm(GemmParams& P, cudaStream_t st) {
  const long long tiles = schedule_tiles(P, TM, TileShape<TM>::TN);
  const dim3 grid{unsigned(tiles)}, block{unsigned(kThreads)};
  if (P.kind == int(OutKind::Float32)) SONIQ_LAUNCH(grid, block, 0, st, mma_gemm_kernel<TM, true, CB>)(P);
  else SONIQ_LAUNCH(grid, block, 0, st, mma_gemm_kernel<TM, false, CB>)(P);
  check_cuda(cudaGetLastError(), "soniq mma_gemm kernel launch");
}

}  // namespace

bool all_int4_block_pairs(const GemmParams& P) { return P.a.max_bits <= 4 && P.b.max_bits <= 4; }

void launch_mma(GemmParams& P, cudaStream_t st, bool int4) {
  const bool u4 = int4 && all_int4_block_pairs(P);
  if (P.a.max_group_rows <= 16) u4 ? launch_mma_tm<16, 4>(P, st) : launch_mma_tm<16, 8>(P, st);
  else u4 ? launch_mma_tm<64, 4>(P, st) : launch_mma_tm<64, 8>(P, st);
}

}  // namespace soniq::cuda::detail
