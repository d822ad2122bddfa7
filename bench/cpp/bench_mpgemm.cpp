// google-benchmark microbenchmarks of the native core (no Python, no torch):
// the bit-serial block kernel of every ISA this CPU has, and the full mpgemm driver.
// Build: cmake -S . -B build/bench -DSONIQ_BUILD_BENCH=ON -DSONIQ_BUILD_PYTHON=OFF && cmake --build build/bench
// Run:   build/bench/soniq_bench --benchmark_filter=.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <vector>

#include "cpp/dispatch.h"
#include "cpp/mpgemm.h"
#include "cpp/pack.h"
#include "cpp/threadpool.h"

namespace {

struct Operand {  // one uniform block: [rows][K] codes packed to planes
  int64_t rows, K, kw;
  int bits;
  std::vector<uint64_t> planes;
  std::vector<int64_t> desc, sums, perm;
  soniq::PackedOperand view(bool is_signed) const {
    return {planes.data(), rows, 1, desc.data(), sums.data(), perm.data(), is_signed};
  }
};

Operand make_operand(int64_t rows, int64_t K, int bits, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> codes(size_t(rows * K));
  for (auto& c : codes) c = uint8_t(rng() & ((1u << bits) - 1));
  Operand op{rows, K, (K + 63) / 64, bits, {}, {0, rows, bits}, std::vector<int64_t>(size_t(rows)),
             std::vector<int64_t>(size_t(rows))};
  op.planes.resize(size_t(bits * rows * op.kw));
  soniq::pack_block(codes.data(), rows, K, K, bits, op.kw, op.planes.data());
  for (int64_t r = 0; r < rows; ++r) {
    op.perm[size_t(r)] = r;
    for (int64_t k = 0; k < K; ++k) op.sums[size_t(r)] += codes[size_t(r * K + k)];
  }
  return op;
}

// args: M, N, K, bits_a, bits_b, isa index (into supported_isas())
void BM_mpgemm(benchmark::State& st) {
  const int64_t M = st.range(0), N = st.range(1), K = st.range(2);
  const int ba = int(st.range(3)), bb = int(st.range(4));
  const auto isas = soniq::supported_isas();
  if (size_t(st.range(5)) >= isas.size()) {
    st.SkipWithError("ISA not supported by this CPU");
    return;
  }
  soniq::set_isa(isas[size_t(st.range(5))]);
  Operand a = make_operand(M, K, ba, 1), b = make_operand(N, K, bb, 2);
  std::vector<int64_t> ksegs{K, a.kw};
  std::vector<int32_t> out(size_t(M * N));
  for (auto _ : st) {
    soniq::mpgemm(a.view(false), b.view(true), ksegs.data(), 1, soniq::Scales{}, soniq::OutKind::Int32, out.data());
    benchmark::DoNotOptimize(out.data());
  }
  st.SetLabel(soniq::active_isa() + " W" + std::to_string(bb) + "A" + std::to_string(ba) + " threads=" +
              std::to_string(soniq::get_num_threads()));
  st.counters["GOP/s"] = benchmark::Counter(2.0 * double(M) * double(N) * double(K), benchmark::Counter::kIsIterationInvariantRate,
                                            benchmark::Counter::kIs1000);
}

void shapes(benchmark::internal::Benchmark* b) {
  for (int isa = 0; isa < 3; ++isa)
    for (auto bits : std::vector<std::pair<int, int>>{{1, 1}, {2, 2}, {4, 4}, {8, 2}, {8, 8}}) {
      b->Args({1, 4096, 4096, bits.first, bits.second, isa});      // GEMV
      b->Args({16, 1024, 1024, bits.first, bits.second, isa});     // small batch
      b->Args({256, 256, 1024, bits.first, bits.second, isa});     // GEMM
    }
}

}  // namespace

BENCHMARK(BM_mpgemm)->Apply(shapes)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_MAIN();
