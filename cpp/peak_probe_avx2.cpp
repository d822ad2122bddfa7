// AVX2 peak probes (see peak_probe.h), in asm as the AVX-512 ones (no spills; built with the
// baseline flags, as the assembler needs none): the byte kernels' vpmaddubsw (32 byte products
// into 16 int16 sums) and its int16 add into one of 6 ymm accumulators; the bit-serial
// kernels' scalar and + popcnt + add on 64-bit words, 8 independent popcounts a step into 4
// accumulators.
#include <cstdint>

#include "peak_probe_common.inl"

namespace soniq {
namespace {

#define SONIQ_MA(i, t) "vpmaddubsw %%ymm14, %%ymm15, %%ymm" #t "\n\tvpaddw %%ymm" #t ", %%ymm" #i \
  ", %%ymm" #i "\n\t"
#define SONIQ_POP(a, t) "mov %1, %%" #t "\n\tand %2, %%" #t "\n\tpopcnt %%" #t ", %%" #t \
  "\n\tadd %%" #t ", %%" #a "\n\t"

void maddubs_body() {
  int64_t n = kReps;
  __asm__ volatile(
      "vpcmpeqb %%ymm14, %%ymm14, %%ymm14\n\t"
      "vpcmpeqb %%ymm15, %%ymm15, %%ymm15\n\t"
      "1:\n\t"
      SONIQ_MA(0, 6) SONIQ_MA(1, 7) SONIQ_MA(2, 8) SONIQ_MA(3, 9) SONIQ_MA(4, 10) SONIQ_MA(5, 11)
      "dec %0\n\tjnz 1b\n\t"
      "vzeroupper\n\t"
      : "+r"(n)
      :
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
        "xmm14", "xmm15", "cc");
}

void popcnt_body() {
  int64_t n = kReps;
  uint64_t x = 0x9E3779B97F4A7C15ull, y = 0xF0F0F0F0F0F0F0F0ull;
  __asm__ volatile(
      "1:\n\t"
      SONIQ_POP(r8, rax) SONIQ_POP(r9, rcx) SONIQ_POP(r10, rdx) SONIQ_POP(r11, rsi)
      SONIQ_POP(r8, rdi) SONIQ_POP(r9, rax) SONIQ_POP(r10, rcx) SONIQ_POP(r11, rdx)
      "dec %0\n\tjnz 1b\n\t"
      : "+r"(n)
      : "r"(x), "r"(y)
      : "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "cc");
}

}  // namespace

PeakRates peak_probe_avx2(double seconds) {
  return measure_rates(seconds, maddubs_body, 6 * 32, popcnt_body, 8 * 64);
}

}  // namespace soniq
