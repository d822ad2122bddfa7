// Reference CUDA mixed-precision GEMM: one thread per output element, bit-serial with
// __popcll over the same packed layout as the CPU. Simple and exact; the fast
// vector-unit and tensor-core kernels are checked against it (and all against the CPU).
#include <stdexcept>

#include "mpgemm_common.cuh"

namespace soniq::cuda::detail {
namespace {

template <bool kFloat>
__global__ void mpgemm_ref_kernel(const __grid_constant__ GemmParams P) {
  const long long i = blockIdx.y * (long long)blockDim.y + threadIdx.y;
  const long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (i >= P.a.rows || j >= P.b.rows) return;
  int ga = 0, gb = 0;
  while (i >= P.a.row_start[ga] + P.a.row_count[ga]) ++ga;
  while (j >= P.b.row_start[gb] + P.b.row_count[gb]) ++gb;
  Total<kFloat> total;
  for (int s = 0; s < P.nsegs; ++s) {
    const int pa = P.a.bits[ga][s], pb = P.b.bits[gb][s];
    const long long kw = P.kw[s];
    const long long stride_a = P.a.row_count[ga] * kw, stride_b = P.b.row_count[gb] * kw;
    const uint64_t* A = P.a.data + P.a.offset[ga][s] + (i - P.a.row_start[ga]) * kw;
    const uint64_t* B = P.b.data + P.b.offset[gb][s] + (j - P.b.row_start[gb]) * kw;
    long long dot = 0;
    for (int p = 0; p < pa; ++p)
      for (int q = 0; q < pb; ++q) {
        long long c = 0;
        for (long long w = 0; w < kw; ++w) c += popc64(A[p * stride_a + w] & B[q * stride_b + w]);
        dot += c << (p + q);
      }
    add_segment<kFloat>(P, s, pa, pb, i, j, dot, total);
  }
  store_total<kFloat>(P, i, j, total);
}

}  // namespace

void launch_ref(const GemmParams& P, cudaStream_t st) {
  dim3 block(32, 8);
  dim3 grid(unsigned((P.b.rows + 31) / 32), unsigned((P.a.rows + 7) / 8));
  if (grid.y > 65535) throw std::invalid_argument("reference kernel: a has more than 524280 rows");
  if (P.kind == int(OutKind::Float32)) SONIQ_LAUNCH(grid, block, 0, st, mpgemm_ref_kernel<true>)(P);
  else SONIQ_LAUNCH(grid, block, 0, st, mpgemm_ref_kernel<false>)(P);
  check_cuda(cudaGetLastError(), "mpgemm_ref_kernel launch");
}

}  // namespace soniq::cuda::detail
