// CPU stand-in for <cuda_runtime.h>: the subset of the CUDA runtime and device language
// soniq's kernels use, so cuda/*.cu compile as plain C++ (-DSONIQ_CUDA_EMU) and run on
// the CPU. Each CUDA thread is a fiber; the blocks of a grid run one after another and the
// threads of a block are scheduled cooperatively, switching only at __syncthreads, warp
// collectives (shuffles, mma.sync) and thread exit. The emulator checks what a GPU would
// fault on or silently get wrong (misaligned vector loads, cp.async outside shared
// memory, unmet barriers, diverged warp collectives, s32 mma overflow, shared-memory
// limits) and reports it as a launch failure with the reason. Not a performance model.
#pragma once
#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static  // one block runs at a time, so a static is the block's copy
#define __restrict__ __restrict

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) ulonglong2 {
  unsigned long long x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline ulonglong2 make_ulonglong2(unsigned long long x, unsigned long long y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNoDevice = 100,
  cudaErrorLaunchFailure = 719,
};
typedef struct soniq_emu_stream* cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrComputeCapabilityMinor = 76 };

cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetDevice(int* dev);
cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value);
// the emulated device is sm_90 unless SONIQ_EMU_CC names another, e.g. 80
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev);

namespace soniq_emu {

const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void syncthreads();
void* dynamic_smem();
void cp_async(void* dst, const void* src, int size, int bytes);
void cp_async_commit();
void cp_async_wait(int n);
void mma_m16n8k32_u8(int (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1);
void mma_m16n8k64_u4(int (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1);
unsigned long long mma_u4_count();  // warp-level u4 mma performed so far (tests: was the INT4 path taken?)
void mma_m16n8k256_b1_and_popc(int (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                               unsigned b1);
unsigned long long shfl_xor(unsigned mask, unsigned long long bits, int lane_mask);
unsigned ballot(unsigned mask, bool predicate);
void check_global_load(const void* p, std::size_t align);
[[noreturn]] void fault(const char* what);

// Runs body() once per thread of every block; returns the launch's error.
class Body {
 public:
  virtual void run() = 0;
  virtual ~Body() = default;
};
cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, std::size_t smem, Body& body);

// The by-value launch: arguments converted to the kernel's parameter types once, then
// every thread calls the kernel with copies (as the GPU gives each thread its own).
template <class... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  std::size_t smem;
  template <class... A>
  void operator()(A&&... args) const {
    struct Call final : Body {
      void (*k)(P...);
      std::tuple<std::decay_t<P>...> params;
      Call(void (*k_)(P...), A&&... a) : k(k_), params(std::forward<A>(a)...) {}
      void run() override { std::apply(k, params); }
    } call(kernel, std::forward<A>(args)...);
    run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem, call);
  }
};
template <class... P>
Launcher<P...> launcher(dim3 grid, dim3 block, std::size_t smem, cudaStream_t, void (*kernel)(P...)) {
  return Launcher<P...>{kernel, grid, block, smem};
}

}  // namespace soniq_emu

#define threadIdx (::soniq_emu::thread_idx())
#define blockIdx (::soniq_emu::block_idx())
#define blockDim (::soniq_emu::block_dim())
#define gridDim (::soniq_emu::grid_dim())

inline void __syncthreads() { ::soniq_emu::syncthreads(); }

// Read-only global load: a GPU faults on a load not aligned to its size.
template <class T>
inline T __ldg(const T* p) {
  ::soniq_emu::check_global_load(p, sizeof(T));
  return *p;
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 64 bits");
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = ::soniq_emu::shfl_xor(mask, bits, lane_mask);
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

inline unsigned __ballot_sync(unsigned mask, int predicate) { return ::soniq_emu::ballot(mask, predicate != 0); }

// One OS thread runs every fiber and switches only at synchronization points, so a
// read-modify-write is atomic as written.
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}
inline int atomicOr(int* p, int v) {
  const int old = *p;
  *p = old | v;
  return old;
}

inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
// Explicitly rounded arithmetic (the emulator is built with -ffp-contract=off).
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __double2float_rn(double v) { return static_cast<float>(v); }
