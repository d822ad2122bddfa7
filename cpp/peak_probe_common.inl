// Shared by the peak probes: the loop that repeats a probe body (kReps iterations of its asm
// loop per call) until `seconds` have passed, keeping the best rate, and the pair of rates a
// probe reports.
#include <chrono>
#include <cstdint>

#include "peak_probe.h"

namespace soniq {
namespace {

constexpr int64_t kReps = 1 << 16;  // asm loop iterations per body call

double rate_per_second(double seconds, double units_per_call, void (*body)()) {
  using clk = std::chrono::steady_clock;
  body();  // warm-up: clock ramp and the vector units' power-up
  double best = 0;
  const auto end = clk::now() + std::chrono::duration<double>(seconds);
  do {
    const auto t0 = clk::now();
    body();
    const double dt = std::chrono::duration<double>(clk::now() - t0).count();
    if (dt > 0 && units_per_call / dt > best) best = units_per_call / dt;
  } while (clk::now() < end);
  return best;
}

// half the time on each body; units: int8 MACs / popcount bits per loop iteration
PeakRates measure_rates(double seconds, void (*int8_body)(), double int8_units, void (*popcount_body)(),
                        double popcount_units) {
  PeakRates r;
  r.int8_macs = rate_per_second(seconds / 2, double(kReps) * int8_units, int8_body);
  r.popcount_bits = rate_per_second(seconds / 2, double(kReps) * popcount_units, popcount_body);
  return r;
}

}  // namespace
}  // namespace soniq
