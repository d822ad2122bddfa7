// The AMX layout GEMM (kernels_amx.inl) on the tile emulation of cpp/amx_emu.h: the AMX
// kernel's code tested on any CPU with AVX-512 (its decode and epilogue are AVX-512). Built
// with the AVX-512 flags; selected only by set_isa("amx_emu") (tests), never by default.
#include <immintrin.h>

#include "amx_emu.h"
#include "kernels_amx.h"

// GCC 12 headers: _mm512_set1_* / reductions trip a false -Wmaybe-uninitialized
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#define SONIQ_AMX_NS amx_emulated
#define SONIQ_TILE_LOADCONFIG(p) ::soniq::amx_emu::loadconfig(p)
#define SONIQ_TILE_RELEASE() ::soniq::amx_emu::release()
#define SONIQ_TILE_ZERO(t) ::soniq::amx_emu::zero(t)
#define SONIQ_TILE_LOADD(t, p, s) ::soniq::amx_emu::loadd(t, p, s)
#define SONIQ_TILE_STORED(t, p, s) ::soniq::amx_emu::stored(t, p, s)
#define SONIQ_TILE_DPBUSD(c, a, b) ::soniq::amx_emu::dpbusd(c, a, b)
#include "kernels_amx.inl"

namespace soniq {

const KernelTable& kernels_amx_emu() {
  static const KernelTable t = [] {
    KernelTable k = kernels_avx512();
    k.name = "amx_emu";
    k.layout_gemm = amx_emulated::layout_gemm;
    amx_pair_thresholds(k);
    return k;
  }();
  return t;
}

}  // namespace soniq
