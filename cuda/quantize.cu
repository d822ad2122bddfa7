// CUDA quantizer: one thread per element, the same arithmetic as cpp/quantize.cpp with
// explicitly rounded multiply/add (no FMA contraction) so CPU and GPU agree bit for bit.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../cpp/philox.h"
#include "../cpp/rounding.h"
#include "ptx.cuh"
#include "quantize_api.h"

namespace soniq::cuda {
namespace {

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

template <class T>
__global__ void quantize_kernel(const T* x, int64_t total, int64_t channels, int64_t inner, const T* scale,
                                const T* lo, const T* hi, const T* alpha, int noise, uint64_t seed,
                                bool values_only, T* out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const int64_t c = (i / inner) % channels;
  const T s = scale[c], inv = div_rn(T(1), s), a = alpha[c];
  const T t = mul_rn(x[i], inv);
  T v;
  if (noise) {
    const T u = T(philox::uniform_f32(seed, uint64_t(i)));
    v = add_rn(t, mul_rn(a, add_rn(u, T(-0.5))));
  } else if (a == T(1)) {
    // as cpp/quantize.cpp: clamp, then round half to even by adding and subtracting 1.5 *
    // 2^mantissa (not rint: that keeps -0.0, where the CPU and torch give +0.0)
    v = add_rn(add_rn(clampv(t, add_rn(lo[c], T(-1)), add_rn(hi[c], T(1))), magic<T>()), -magic<T>());
  } else {  // signed 1-bit: c = round((t + 1) / 2) in {0, 1}, value 2c - 1
    const T half = clampv(mul_rn(add_rn(t, T(1)), T(0.5)), T(-2), T(3));
    v = add_rn(mul_rn(add_rn(add_rn(half, magic<T>()), -magic<T>()), T(2)), T(-1));
  }
  v = clampv(v, lo[c], hi[c]);
  out[i] = values_only ? v : mul_rn(v, s);
}

template <class T>
__global__ void uniform_kernel(int64_t n, uint64_t seed, T* out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = T(philox::uniform_f32(seed, uint64_t(i)));
}

void check(cudaError_t e) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("soniq CUDA quantize: ") + cudaGetErrorString(e));
}

template <class T>
void launch(const T* x, int64_t outer, int64_t channels, int64_t inner, const T* scale, const T* lo, const T* hi,
            const T* alpha, int noise, uint64_t seed, bool values_only, T* out, void* stream) {
  const int64_t total = outer * channels * inner;
  if (total == 0) return;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  SONIQ_LAUNCH(unsigned(blocks), threads, 0, static_cast<cudaStream_t>(stream), quantize_kernel<T>)(
      x, total, channels, inner, scale, lo, hi, alpha, noise, seed, values_only, out);
  check(cudaGetLastError());
}

}  // namespace

void quantize(int dtype_bytes, const void* x, int64_t outer, int64_t channels, int64_t inner, const void* scale,
              const void* lo, const void* hi, const void* alpha, int noise, uint64_t seed, bool values_only,
              void* out, void* stream) {
  if (dtype_bytes == 4)
    launch<float>(static_cast<const float*>(x), outer, channels, inner, static_cast<const float*>(scale),
                  static_cast<const float*>(lo), static_cast<const float*>(hi), static_cast<const float*>(alpha),
                  noise, seed, values_only, static_cast<float*>(out), stream);
  else
    launch<double>(static_cast<const double*>(x), outer, channels, inner, static_cast<const double*>(scale),
                   static_cast<const double*>(lo), static_cast<const double*>(hi), static_cast<const double*>(alpha),
                   noise, seed, values_only, static_cast<double*>(out), stream);
}

void philox_uniform(int dtype_bytes, int64_t n, uint64_t seed, void* out, void* stream) {
  if (n == 0) return;
  const int threads = 256;
  const unsigned blocks = unsigned((n + threads - 1) / threads);
  if (dtype_bytes == 4)
    SONIQ_LAUNCH(blocks, threads, 0, static_cast<cudaStream_t>(stream), uniform_kernel<float>)(n, seed, static_cast<float*>(out));
  else
    SONIQ_LAUNCH(blocks, threads, 0, static_cast<cudaStream_t>(stream), uniform_kernel<double>)(n, seed, static_cast<double*>(out));
  check(cudaGetLastError());
}

}  // namespace soniq::cuda
