// Reference CUDA mixed-precision GEMM: one thread per output element, bit-serial with
// __popcll over the same packed layout as the CPU. Simple and exact; the fast
// vector-unit and tensor-core kernels are checked against it.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda_api.h"

namespace soniq::cuda {
namespace {

struct DevOperand {
  const uint64_t* data;
  int64_t rows, ngroups;
  const int64_t* desc;
  const int64_t* sums;
  const int64_t* perm;
  bool is_signed;
};

__device__ void affine(int bits, bool is_signed, long long& alpha, long long& offset) {
  if (!is_signed) { alpha = 1; offset = 0; }
  else if (bits == 1) { alpha = 2; offset = -1; }
  else { alpha = 1; offset = -(1LL << (bits - 1)); }
}

// Finds the row group of packed row r and the word offset of its (group, segment) block.
__device__ int64_t locate(const DevOperand& op, const int64_t* ksegs, int64_t nsegs, int64_t r,
                          int64_t s, int64_t& g_out) {
  int64_t off = 0;
  for (int64_t g = 0; g < op.ngroups; ++g) {
    const int64_t* d = op.desc + g * (2 + nsegs);
    if (r < d[0] + d[1]) {
      for (int64_t t = 0; t < s; ++t) off += d[2 + t] * d[1] * ksegs[2 * t + 1];
      g_out = g;
      return off;
    }
    for (int64_t t = 0; t < nsegs; ++t) off += d[2 + t] * d[1] * ksegs[2 * t + 1];
  }
  g_out = -1;
  return -1;
}

__global__ void mpgemm_ref_kernel(DevOperand a, DevOperand b, const int64_t* ksegs, int64_t nsegs,
                                  Scales sc, int kind, void* out) {
  const int64_t i = blockIdx.y * int64_t(blockDim.y) + threadIdx.y;
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= a.rows || j >= b.rows) return;
  long long itotal = 0;
  double ftotal = 0.0;
  for (int64_t s = 0; s < nsegs; ++s) {
    int64_t ga, gb;
    const int64_t oa = locate(a, ksegs, nsegs, i, s, ga), ob = locate(b, ksegs, nsegs, j, s, gb);
    const int64_t* da = a.desc + ga * (2 + nsegs);
    const int64_t* db = b.desc + gb * (2 + nsegs);
    const int pa = int(da[2 + s]), pb = int(db[2 + s]);
    const int64_t klen = ksegs[2 * s], kw = ksegs[2 * s + 1];
    const uint64_t* A = a.data + oa + (i - da[0]) * kw;
    const uint64_t* B = b.data + ob + (j - db[0]) * kw;
    long long dot = 0;
    for (int p = 0; p < pa; ++p)
      for (int q = 0; q < pb; ++q) {
        long long c = 0;
        for (int64_t w = 0; w < kw; ++w) c += __popcll(A[p * da[1] * kw + w] & B[q * db[1] * kw + w]);
        dot += c << (p + q);
      }
    long long aa, offa, ab, offb;
    affine(pa, a.is_signed, aa, offa);
    affine(pb, b.is_signed, ab, offb);
    const long long v = aa * ab * dot + aa * offb * a.sums[i * nsegs + s] + ab * offa * b.sums[j * nsegs + s] +
                        klen * offa * offb;
    const double ss = double(sc.a_seg ? sc.a_seg[s] : 1.0f) * double(sc.b_seg ? sc.b_seg[s] : 1.0f);
    if (kind == int(OutKind::Float32)) ftotal += double(v) * ss;
    else itotal += v;
  }
  const int64_t m = a.perm[i], n = b.perm[j], idx = m * b.rows + n;
  if (kind == int(OutKind::Int32)) static_cast<int*>(out)[idx] = int(itotal);
  else if (kind == int(OutKind::Int64)) static_cast<long long*>(out)[idx] = itotal;
  else {
    if (sc.a_row) ftotal *= double(sc.a_row[m]);
    if (sc.b_row) ftotal *= double(sc.b_row[n]);
    static_cast<float*>(out)[idx] = float(ftotal);
  }
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
}

std::string& last_query_error() {
  static std::string s;
  return s;
}

}  // namespace

int device_count() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    last_query_error() = cudaGetErrorString(e);
    cudaGetLastError();  // clear the sticky-free error state
    return 0;
  }
  return n;
}

std::string runtime_error_text() { return last_query_error(); }

void mpgemm(const PackedOperand& a, const PackedOperand& b, const int64_t* ksegs, int64_t nsegs,
            const Scales& scales, OutKind kind, void* out, void* stream) {
  DevOperand da{a.data, a.rows, a.ngroups, a.desc, a.sums, a.perm, a.is_signed};
  DevOperand db{b.data, b.rows, b.ngroups, b.desc, b.sums, b.perm, b.is_signed};
  dim3 block(32, 8);
  dim3 grid(unsigned((b.rows + 31) / 32), unsigned((a.rows + 7) / 8));
  mpgemm_ref_kernel<<<grid, block, 0, static_cast<cudaStream_t>(stream)>>>(da, db, ksegs, nsegs, scales,
                                                                             int(kind), out);
  check(cudaGetLastError(), "mpgemm_ref_kernel launch");
}

}  // namespace soniq::cuda
