// The AMX layout GEMM (kernels_amx.inl) on the tile instructions. Built with the AVX-512 and
// AMX flags; runs only when the dispatcher picked kernels_amx() (CPUID AMX-TILE and AMX-INT8,
// the tile state enabled in XCR0, and this process's tile-data permission from arch_prctl).
#include "kernels_amx.h"

#include <immintrin.h>

#include "kernels_avx512_layout.h"

// GCC 12 headers: _mm512_set1_* / reductions trip a false -Wmaybe-uninitialized
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#define SONIQ_AMX_NS amx
#define SONIQ_TILE_LOADCONFIG(p) _tile_loadconfig(p)
#define SONIQ_TILE_RELEASE() _tile_release()
#define SONIQ_TILE_ZERO(t) _tile_zero(t)
#define SONIQ_TILE_LOADD(t, p, s) _tile_loadd(t, p, s)
#define SONIQ_TILE_STORED(t, p, s) _tile_stored(t, p, s)
#define SONIQ_TILE_DPBUSD(c, a, b) _tile_dpbusd(c, a, b)
#include "kernels_amx.inl"

namespace soniq {

const KernelTable& kernels_amx() {
  static const KernelTable t = [] {
    KernelTable k = kernels_avx512();  // GEMV, quantization and the rest stay AVX-512
    k.name = "amx";
    k.layout_gemm = amx::layout_gemm;
    amx_pair_thresholds(k);
    return k;
  }();
  return t;
}

}  // namespace soniq
