// AVX-512 peak probes (see peak_probe.h), built with the baseline flags: the timing code is
// plain C++, and only the two asm functions carry target("avx512f") (which lets their asm name
// zmm16-31 as clobbers; the assembler itself needs no flags). The loops are written in asm: GCC spills 24
// intrinsic accumulators to the stack (a third of the rate), where the GEMM block's named
// registers stay put. 24 independent zmm accumulators, as the 6 x 4-tile GEMM block holds:
// enough for a 4-cycle vpdpbusd at two per cycle.
#include <cstdint>

#include "peak_probe_common.inl"

namespace soniq {
namespace {

#define SONIQ_DP(i) "vpdpbusd %%zmm30, %%zmm31, %%zmm" #i "\n\t"
#define SONIQ_PC(i, t) "vpandq %%zmm30, %%zmm31, %%zmm" #t "\n\tvpopcntq %%zmm" #t ", %%zmm" #t \
  "\n\tvpaddq %%zmm" #t ", %%zmm" #i ", %%zmm" #i "\n\t"

// operands zmm30 / zmm31 (all ones), accumulators and temporaries zmm0-23
#define SONIQ_PROBE_INIT "vpternlogd $0xff, %%zmm30, %%zmm30, %%zmm30\n\tvpternlogd $0xff, %%zmm31, %%zmm31, %%zmm31\n\t1:\n\t"
#define SONIQ_PROBE_CLOBBERS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", \
  "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", \
  "xmm30", "xmm31", "cc"

__attribute__((target("avx512f"))) void vnni_body() {
  int64_t n = kReps;
  __asm__ volatile(
      SONIQ_PROBE_INIT
      SONIQ_DP(0) SONIQ_DP(1) SONIQ_DP(2) SONIQ_DP(3) SONIQ_DP(4) SONIQ_DP(5) SONIQ_DP(6) SONIQ_DP(7)
      SONIQ_DP(8) SONIQ_DP(9) SONIQ_DP(10) SONIQ_DP(11) SONIQ_DP(12) SONIQ_DP(13) SONIQ_DP(14)
      SONIQ_DP(15) SONIQ_DP(16) SONIQ_DP(17) SONIQ_DP(18) SONIQ_DP(19) SONIQ_DP(20) SONIQ_DP(21)
      SONIQ_DP(22) SONIQ_DP(23)
      "dec %0\n\tjnz 1b\n\t"
      "vzeroupper\n\t"
      : "+r"(n)
      :
      : SONIQ_PROBE_CLOBBERS);
}

// the bit-serial kernels' step: and, popcount, add into one of 12 accumulators
__attribute__((target("avx512f"))) void popcount_body() {
  int64_t n = kReps;
  __asm__ volatile(
      SONIQ_PROBE_INIT
      SONIQ_PC(0, 12) SONIQ_PC(1, 13) SONIQ_PC(2, 14) SONIQ_PC(3, 15) SONIQ_PC(4, 16) SONIQ_PC(5, 17)
      SONIQ_PC(6, 18) SONIQ_PC(7, 19) SONIQ_PC(8, 20) SONIQ_PC(9, 21) SONIQ_PC(10, 22) SONIQ_PC(11, 23)
      "dec %0\n\tjnz 1b\n\t"
      "vzeroupper\n\t"
      : "+r"(n)
      :
      : SONIQ_PROBE_CLOBBERS);
}

}  // namespace

PeakRates peak_probe_avx512(double seconds) {
  return measure_rates(seconds, vnni_body, 24 * 64, popcount_body, 12 * 512);
}

}  // namespace soniq
