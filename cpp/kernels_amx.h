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

// What AMX changes in the AVX-512 table's thresholds (both tables, so the emulation picks as
// the hardware does): the tiles' int8 rate is ~8x vpdpbusd's and above vpopcntq's, so tiles of
// more than 2 A rows run every bit pair on the layout (W1A1 PackedLinear on a Xeon with AMX, 2 threads:
// 0.46-0.77x the time of the bit-serial path at M = 16-2048 and 2048^3), and no layer keeps
// its planes (every layer runs the fused forward). GEMV keeps the AVX-512 choice. The tile
// rate is not probed (the benchmarks keep their nominal figure for AMX): vpdpbusd's is not it.
inline void amx_pair_thresholds(KernelTable& k) {
  k.bitserial_max_pairs = 0;
  k.keep_planes_max_pairs = 0;
  k.peak_probe = nullptr;
}

namespace amx_emulated {
void layout_gemm(const uint8_t* A, int64_t lda, int64_t M, const int8_t* L, int bits, int64_t N, int64_t kw,
                 int64_t* C, int64_t ldc, int shift, const int64_t* rowterm, const int64_t* colterm,
                 const LayoutEpilogue* ep);
}  // namespace amx_emulated
const KernelTable& kernels_amx_emu();

}  // namespace soniq
