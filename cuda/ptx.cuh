// The few device operations the kernels write as inline PTX or CUDA-only syntax, in one
// place: asynchronous global->shared copies, the tensor-core mma shapes, dynamic shared
// memory and the launch. Under SONIQ_CUDA_EMU (tests/cuda_emu: the kernels compiled as
// plain C++ and run on the CPU) each one maps to the emulator's implementation of the PTX
// semantics instead; the kernels themselves are the same source either way.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#if defined(SONIQ_CUDA_EMU)
// dynamic shared memory of the running block (the emulator allocates it per block)
#define SONIQ_DYNAMIC_SMEM(type, name) type* const name = static_cast<type*>(::soniq_emu::dynamic_smem())
// kernel<<<grid, block, smem, stream>>>(args): the emulator runs every block on the CPU
#define SONIQ_LAUNCH(grid, block, smem, stream, ...) ::soniq_emu::launcher((grid), (block), (smem), (stream), __VA_ARGS__)
#else
#define SONIQ_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#define SONIQ_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>
#endif

namespace soniq::cuda::detail {

// cp.async: `bytes` (0..size) bytes from global src, the rest of the `size`-byte shared
// destination zero-filled; completes at the matching cp_async_wait.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
#if defined(SONIQ_CUDA_EMU)
  ::soniq_emu::cp_async(dst, src, 16, bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(unsigned(__cvta_generic_to_shared(dst))),
               "l"(__cvta_generic_to_global(src)), "r"(bytes));
#endif
}
__device__ __forceinline__ void cp_async8(void* dst, const void* src, int bytes) {
#if defined(SONIQ_CUDA_EMU)
  ::soniq_emu::cp_async(dst, src, 8, bytes);
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(unsigned(__cvta_generic_to_shared(dst))),
               "l"(__cvta_generic_to_global(src)), "r"(bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(SONIQ_CUDA_EMU)
  ::soniq_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(SONIQ_CUDA_EMU)
  ::soniq_emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// c += A (16x32 u8, row) * B (32x8 u8, col) in s32; fragments as in the PTX ISA,
// "Matrix Fragments for mma.m16n8k32" (g = lane / 4, t = lane % 4): a0 row g, k 4t..4t+3;
// a1 row g+8; a2 row g, k 16+4t..; a3 row g+8, k 16+4t..; b0 k 4t.., b1 k 16+4t.., col g;
// c0, c1 row g, cols 2t, 2t+1; c2, c3 row g+8.
__device__ __forceinline__ void mma_u8_m16n8k32(int (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                                unsigned b0, unsigned b1) {
#if defined(SONIQ_CUDA_EMU)
  ::soniq_emu::mma_m16n8k32_u8(c, a0, a1, a2, a3, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.u8.u8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// c += A (16x64 u4, row) * B (64x8 u4, col) in s32 ("Matrix Fragments for mma.m16n8k64":
// 8 elements per register, low nibble first): a0 row g, k 8t..8t+7; a1 row g+8; a2 row g,
// k 32+8t..; a3 row g+8, k 32+8t..; b0 k 8t.., b1 k 32+8t.., col g; c as for m16n8k32.
// INT4 tensor cores exist on sm_80-89; sm_90 accepts the instruction at a lower rate.
__device__ __forceinline__ void mma_u4_m16n8k64(int (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                                unsigned b0, unsigned b1) {
#if defined(SONIQ_CUDA_EMU)
  ::soniq_emu::mma_m16n8k64_u4(c, a0, a1, a2, a3, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.s32.u4.u4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// d = popcount(A_row & B_col) over k = 256 (b1, "Matrix Fragments for mma.m16n8k256"):
// a0 row g, k 32t..32t+31; a1 row g+8; a2 row g, k 128+32t..; a3 row g+8, k 128+32t..;
// b0 k 32t.., b1 k 128+32t.., col g; d as for m16n8k32.
__device__ __forceinline__ void mma_b1_m16n8k256(int (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                                 unsigned b0, unsigned b1) {
  d[0] = d[1] = d[2] = d[3] = 0;
#if defined(SONIQ_CUDA_EMU)
  ::soniq_emu::mma_m16n8k256_b1_and_popc(d, a0, a1, a2, a3, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

}  // namespace soniq::cuda::detail
