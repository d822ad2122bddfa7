// Expands one packed uniform block (bit planes [bits][rows][kw]) to row-major signed
// bytes c = u - 128 for the real entries and 0 for padding (columns klen..kpad, rows
// rows..rows_pad), the operand format of cuBLAS INT8 (torch._int_mm). The shift keeps
// 8-bit unsigned codes in int8; python/soniq/ops/_int8mm.py undoes it with the code sums:
//   sum u_a u_b = sum c_a c_b + 128 (sum u_a + sum u_b) - 128^2 klen.
#include <stdexcept>

#include "mpgemm_common.cuh"

namespace soniq::cuda {
namespace {

// bit i of x -> byte i (0 or 1)
__device__ __forceinline__ unsigned long long spread8(unsigned long long x) {
  const unsigned long long t = (x * 0x0101010101010101ull) & 0x8040201008040201ull;
  return ((t + 0x7F7F7F7F7F7F7F7Full) >> 7) & 0x0101010101010101ull;
}

__global__ void expand_codes_kernel(const uint64_t* planes, int bits, long long rows, long long kw, long long klen,
                                    unsigned long long* out, long long rows_pad, long long kpad) {
  const long long groups = kpad / 8;  // one thread per 8 output bytes
  const long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (idx >= rows_pad * groups) return;
  const long long r = idx / groups, k0 = (idx % groups) * 8;
  unsigned long long v = 0;
  if (r < rows && k0 < klen) {
    const long long w = k0 / 64;
    const int sh = int(k0 % 64);
    unsigned long long codes = 0;
    for (int p = 0; p < bits; ++p) codes |= spread8((__ldg(planes + (p * rows + r) * kw + w) >> sh) & 0xFF) << p;
    const long long valid = klen - k0;
    const unsigned long long keep = valid >= 8 ? ~0ull : ((1ull << (8 * valid)) - 1);
    v = (codes ^ 0x8080808080808080ull) & keep;  // u ^ 0x80 is the byte of u - 128
  }
  out[idx] = v;
}

}  // namespace

void expand_codes(const uint64_t* planes, int bits, int64_t rows, int64_t kw, int64_t klen, void* out,
                  int64_t rows_pad, int64_t kpad, void* stream) {
  if (bits < 1 || bits > 8 || rows <= 0 || klen <= 0 || kw * 64 < klen || rows_pad < rows || kpad < klen ||
      kpad % 8 != 0)
    throw std::invalid_argument("expand_codes: inconsistent block shape");
  if (reinterpret_cast<uintptr_t>(out) % 8 != 0) throw std::invalid_argument("expand_codes: out must be 8-byte aligned");
  const long long n = rows_pad * (kpad / 8);
  const int threads = 256;
  SONIQ_LAUNCH(unsigned((n + threads - 1) / threads), threads, 0, static_cast<cudaStream_t>(stream), expand_codes_kernel)(
      planes, bits, rows, kw, klen, static_cast<unsigned long long*>(out), rows_pad, kpad);
  detail::check_cuda(cudaGetLastError(), "soniq expand_codes kernel launch");
}

}  // namespace soniq::cuda
