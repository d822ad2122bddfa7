// AMX layout GEMM (kernels_amx.inl): kernels_amx() runs it on the tile instructions (built
// with the AMX flags), kernels_amx_emu() on the emulation of cpp/amx_emu.h (tests). Both
// tables are kernels_avx512()'s with this layout_gemm.
#pragma once
#include <cstdint>

#include "kernels.h"

namespace soniq {

#if defined(SONIQ_HAVE_AMX)
namespace amx {
void layout_gemm(const uint8_t* A, int64_t lda, int64_t M, const int8_t* L, int bits, int64_t N, int64_t kw,
                 int64_t* C, int64_t ldc, int shift, const int64_t* rowterm, const int64_t* colterm,
                 const LayoutEpilogue* ep);
}  // namespace amx
const KernelTable& kernels_amx();
#endif

namespace amx_emulated {
void layout_gemm(const uint8_t* A, int64_t lda, int64_t M, const int8_t* L, int bits, int64_t N, int64_t kw,
                 int64_t* C, int64_t ldc, int shift, const int64_t* rowterm, const int64_t* colterm,
                 const LayoutEpilogue* ep);
}  // namespace amx_emulated
const KernelTable& kernels_amx_emu();

}  // namespace soniq
