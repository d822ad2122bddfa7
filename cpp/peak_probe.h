// Measured instruction throughput of the calling core, for the benchmarks' "limit" column:
// the nominal clock /proc/cpuinfo reports is not what the core runs at (an AMD EPYC Zen 5
// VM here reports 2.6 GHz and runs vpdpbusd at 2 per cycle of ~4.2 GHz), and how many
// dot-product instructions a core retires per cycle differs by microarchitecture (Zen 4: one
// zmm vpdpbusd per cycle, Zen 5: two). Each probe runs the instruction mix of its ISA's
// inner loop on independent accumulators (more chains than latency x throughput needs).
#pragma once

namespace soniq {

struct PeakRates {
  double int8_macs = 0;     // byte multiply-adds per second (the GEMM kernels' instruction)
  double popcount_bits = 0; // and + popcount + add bit products per second (bit-serial kernels)
};

using PeakProbeFn = PeakRates (*)(double seconds);

#if defined(SONIQ_HAVE_X86_ISAS)
PeakRates peak_probe_avx2(double seconds);    // vpmaddubsw + vpaddw; scalar and + popcnt + add
PeakRates peak_probe_avx512(double seconds);  // vpdpbusd zmm; vpandq + vpopcntq + vpaddq zmm
#endif

}  // namespace soniq
