// Shared by the peak probes: a monotonic clock and the loop that repeats a probe body until
// `seconds` have passed (the body runs `kReps` iterations per call, each of `ops` units).
#include <chrono>
#include <cstdint>

namespace soniq {
namespace {

template <class Body>
double rate_per_second(double seconds, double units_per_call, Body&& body) {
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

}  // namespace
}  // namespace soniq
