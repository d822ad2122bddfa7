// google-benchmark microbenchmarks of the CPU kernels, per ISA this CPU supports.
//   cmake -S . -B build/bench -DSONIQ_BUILD_BENCH=ON -DSONIQ_BUILD_PYTHON=OFF -DSONIQ_CUDA=OFF
//   cmake --build build/bench && build/bench/soniq_bench --benchmark_filter=avx2
// Counters: GOP/s counts a multiply-add as 2 ops (as the Python benchmarks do).
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "cpp/actpack.h"
#include "cpp/cpu_features.h"
#include "cpp/dispatch.h"
#include "cpp/gelu.h"
#include "cpp/hadamard.h"
#include "cpp/kernels.h"
#include "cpp/mpgemm.h"
#include "cpp/threadpool.h"
#include "cpp/trellis.h"
#include "cpp/wlayout.h"

using namespace soniq;

namespace {

std::vector<uint64_t> random_words(size_t n, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::vector<uint64_t> v(n);
  for (auto& x : v) x = g();
  return v;
}

const KernelTable* table(const std::string& isa) { return kernels_for(isa); }

void set_gops(benchmark::State& st, double macs) {
  st.counters["GOP/s"] = benchmark::Counter(2.0 * macs, benchmark::Counter::kIsIterationInvariantRate,
                                            benchmark::Counter::kIs1000);
}

// One block kernel call on an (M x N x K) block, single thread.
void bm_bitserial(benchmark::State& st, const KernelTable* kt, int pa, int pb, int64_t M, int64_t N, int64_t K) {
  const int64_t kw = (K + 63) / 64;
  auto A = random_words(size_t(pa * M * kw), 1), B = random_words(size_t(pb * N * kw), 2);
  std::vector<int64_t> C(size_t(M * N));
  for (auto _ : st) {
    kt->bitserial(A.data(), pa, M * kw, M, B.data(), pb, N * kw, N, kw, C.data(), N, 0);
    benchmark::DoNotOptimize(C.data());
  }
  set_gops(st, double(M) * N * K);
}

// A layout kernel (gemv: weights decoded in registers; gemm: per-tile L1 buffer) on one
// block, the weight execution layout built beforehand (as a packed weight holds it).
void bm_layout(benchmark::State& st, const KernelTable* kt, bool gemv, int pa, int pb, int64_t M, int64_t N,
               int64_t K) {
  const int64_t kw = (K + 63) / 64;
  auto Ap = random_words(size_t(pa * M * kw), 1), B = random_words(size_t(pb * N * kw), 2);
  std::vector<uint8_t> A(size_t(M * kw * 64));
  kt->unpack_planes(Ap.data(), pa, M * kw, M, kw, A.data(), kw * 64);
  std::vector<int64_t> desc{0, N, pb}, ksegs{K, kw};
  PackedOperand b{B.data(), N, 1, desc.data(), nullptr, nullptr, false};
  std::vector<int8_t> L(size_t(layout_offsets(desc.data(), 1, ksegs.data(), 1).back()));
  layout_build(b, ksegs.data(), 1, L.data());
  std::vector<int64_t> C(size_t(M * N));
  for (auto _ : st) {
    (gemv ? kt->layout_gemv : kt->layout_gemm)(A.data(), kw * 64, M, L.data(), pb, N, kw, C.data(), N, 0, nullptr, nullptr, nullptr);
    benchmark::DoNotOptimize(C.data());
  }
  set_gops(st, double(M) * N * K);
}

void bm_pack(benchmark::State& st, const KernelTable* kt, int bits, int64_t rows, int64_t K) {
  std::mt19937 g(3);
  std::vector<uint8_t> codes(size_t(rows * K));
  for (auto& c : codes) c = uint8_t(g() & ((1u << bits) - 1));
  const int64_t kw = (K + 63) / 64;
  std::vector<uint64_t> out(size_t(bits * rows * kw));
  for (auto _ : st) {
    kt->pack_planes(codes.data(), rows, K, K, bits, kw, out.data());
    benchmark::DoNotOptimize(out.data());
  }
  st.SetBytesProcessed(int64_t(st.iterations()) * rows * K);
}

void bm_unpack(benchmark::State& st, const KernelTable* kt, int bits, int64_t rows, int64_t K) {
  const int64_t kw = (K + 63) / 64;
  auto planes = random_words(size_t(bits * rows * kw), 4);
  std::vector<uint8_t> out(size_t(rows * kw * 64));
  for (auto _ : st) {
    kt->unpack_planes(planes.data(), bits, rows * kw, rows, kw, out.data(), kw * 64);
    benchmark::DoNotOptimize(out.data());
  }
  st.SetBytesProcessed(int64_t(st.iterations()) * rows * K);
}

// Fused activation quantize + pack kernel alone: one row segment of K floats in packed order.
void bm_quant_pack(benchmark::State& st, const KernelTable* kt, int bits, int64_t K) {
  const int64_t kw = (K + 63) / 64;
  std::mt19937 g(7);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  std::vector<float> x(size_t(kw * 64));
  for (auto& v : x) v = nd(g);
  std::vector<uint64_t> out(size_t(bits * kw));
  const float hi = float((1 << (bits - 1)) - 1), lo = -hi - 1.0f;
  bool nan = false;
  for (auto _ : st) {
    benchmark::DoNotOptimize(kt->quant_pack(x.data(), nullptr, K, kw, 0.5f, bits == 1 ? -1.0f : lo, bits == 1 ? 1.0f : hi,
                                            bits == 1 ? 2 : 1, bits, out.data(), kw, &nan));
  }
  st.SetItemsProcessed(int64_t(st.iterations()) * K);
}

// Block Hadamard rotation of one activation row (the fused forward's quantize pass, cpp/hadamard.h).
void bm_hadamard(benchmark::State& st, const KernelTable* kt, int block, int64_t K) {
  std::mt19937 g(11);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  std::vector<float> x(static_cast<size_t>(K)), out(static_cast<size_t>(K));
  for (auto& v : x) v = nd(g);
  const HadamardRowFn f = kt->hadamard_row ? kt->hadamard_row : hadamard_row_ref;
  for (auto _ : st) {
    f(x.data(), K, block, out.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  st.SetItemsProcessed(int64_t(st.iterations()) * K);
}

// The exact GELU in place over one output row of the 384 -> 1536 feed-forward layer
// (PackedLinear's fused activation, cpp/gelu.h); a fresh copy of the row each time (repeated
// GELU would walk negative values into subnormals).
void bm_gelu(benchmark::State& st, const KernelTable* kt, int64_t n) {
  std::mt19937 g(12);
  std::normal_distribution<float> nd(0.0f, 1.5f);
  std::vector<float> x(static_cast<size_t>(n)), y(static_cast<size_t>(n));
  for (auto& v : x) v = nd(g);
  const GeluRowFn f = kt->gelu_row ? kt->gelu_row : gelu_row_ref;
  for (auto _ : st) {
    std::copy(x.begin(), x.end(), y.begin());
    f(y.data(), n);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  st.SetItemsProcessed(int64_t(st.iterations()) * n);
}

// One Viterbi step of the trellis rounding (cpp/trellis.h, soniq.ptq's trellis_states_log2):
// 2^L path costs in, 2^L out; items are states.
void bm_trellis_step(benchmark::State& st, const KernelTable* kt, int L, int bits) {
  std::mt19937 g(13);
  std::normal_distribution<float> nd(0.0f, 32.0f);
  const size_t S = size_t{1} << L;
  std::vector<float> cost(S), next(S), values(S), m((S >> bits) + 16);
  std::vector<uint8_t> back(S >> bits);
  for (size_t i = 0; i < S; ++i) cost[i] = std::abs(nd(g)) * 100.0f, values[i] = std::round(nd(g));
  const TrellisStepFn f = kt->trellis_step ? kt->trellis_step : trellis_step_ref;
  for (auto _ : st) {
    f(cost.data(), next.data(), back.data(), m.data(), values.data(), 3.0f, 1.5f, L, bits);
    benchmark::DoNotOptimize(next.data());
    benchmark::ClobberMemory();
  }
  st.SetItemsProcessed(int64_t(st.iterations()) * int64_t(S));
}

// The whole fused driver (gather through a two-tier K permutation, threads) on [M, K]
// activations: 25% of the columns 8-bit, 75% 4-bit, signed.
void bm_quantize_pack(benchmark::State& st, std::string isa, int64_t M, int64_t K, int threads) {
  set_isa(isa);
  set_num_threads(threads);
  std::mt19937 g(8);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(size_t(M * K));
  for (auto& v : x) v = nd(g);
  std::vector<int64_t> perm, hi8;
  for (int64_t k = 0; k < K; ++k) (g() % 4 ? perm : hi8).push_back(k);
  const int64_t n4 = int64_t(perm.size()), n8 = int64_t(hi8.size());
  perm.insert(perm.end(), hi8.begin(), hi8.end());
  const int64_t segs[6] = {n4, (n4 + 63) / 64, 4, n8, (n8 + 63) / 64, 8};
  const float scales[2] = {0.5f, 0.03f};
  ActLayout L{K, perm.data(), 2, segs, scales};
  std::vector<uint64_t> data(size_t(M * act_row_words(L)));
  std::vector<int64_t> sums(size_t(M * 2));
  for (auto _ : st) {
    quantize_pack(x.data(), M, K, L, true, data.data(), sums.data());
    benchmark::DoNotOptimize(data.data());
  }
  st.SetItemsProcessed(int64_t(st.iterations()) * M * K);
  set_num_threads(default_num_threads());
}

// The whole driver (tiling, threads, byte expansion of A, corrections) on one uniform layer.
void bm_mpgemm(benchmark::State& st, std::string isa, int ba, int bb, int64_t M, int64_t N, int64_t K,
               int threads) {
  set_isa(isa);
  set_num_threads(threads);
  const int64_t kw = (K + 63) / 64;
  auto Ad = random_words(size_t(ba * M * kw), 5), Bd = random_words(size_t(bb * N * kw), 6);
  if (K % 64)  // zero the padding bits past K, as the packer does
    for (auto* v : {&Ad, &Bd})
      for (size_t w = size_t(kw - 1); w < v->size(); w += size_t(kw)) (*v)[w] &= (uint64_t(1) << (K % 64)) - 1;
  std::vector<int64_t> da{0, M, ba}, db{0, N, bb}, sa(static_cast<size_t>(M), 0), sb(static_cast<size_t>(N), 0), pa(static_cast<size_t>(M)), pb(static_cast<size_t>(N));
  for (int64_t i = 0; i < M; ++i) pa[size_t(i)] = i;
  for (int64_t j = 0; j < N; ++j) pb[size_t(j)] = j;
  PackedOperand a{Ad.data(), M, 1, da.data(), sa.data(), pa.data(), false};
  PackedOperand b{Bd.data(), N, 1, db.data(), sb.data(), pb.data(), false};
  int64_t ksegs[2] = {K, kw};
  // the weight's execution layout, built once as a packed weight keeps it
  std::vector<int8_t> lay(size_t(layout_offsets(db.data(), 1, ksegs, 1).back()));
  layout_build(b, ksegs, 1, lay.data());
  // float output with per-row weight scales and a per-segment activation scale, as a packed layer runs it
  std::vector<float> out(size_t(M * N)), wscale(size_t(N), 0.01f);
  const float ascale = 0.02f;
  const Scales sc{nullptr, wscale.data(), &ascale, nullptr};
  for (auto _ : st) {
    mpgemm(a, b, ksegs, 1, sc, OutKind::Float32, out.data(), lay.data());
    benchmark::DoNotOptimize(out.data());
  }
  set_gops(st, double(M) * N * K);
  set_num_threads(default_num_threads());
}

// The column merge (kernels.h ColumnMerge) of a float output whose weight tiers interleave:
// G tiers drawn per column, rows x N floats in packed order back to the original order.
void bm_merge(benchmark::State& st, const KernelTable* kt, int G, int64_t rows, int64_t N) {
  std::mt19937_64 g(7);
  std::vector<int64_t> tier(static_cast<size_t>(N)), perm, desc;
  for (auto& t : tier) t = int64_t(g() % uint64_t(G));
  for (int64_t t = 0; t < G; ++t) {
    desc.insert(desc.end(), {int64_t(perm.size()), 0, 4});
    for (int64_t c = 0; c < N; ++c)
      if (tier[size_t(c)] == t) perm.push_back(c);
    desc[size_t(3 * t + 1)] = int64_t(perm.size()) - desc[size_t(3 * t)];
  }
  std::vector<int64_t> sums(size_t(N), 0);
  const PackedOperand b{nullptr, N, G, desc.data(), sums.data(), perm.data(), true};
  const WeightPrep prep = mpgemm_prepare(b, 1, nullptr, nullptr);
  const ColumnMerge cm = prep.column_merge();
  const int64_t lds = N + 16;
  std::vector<float> src(size_t(rows * lds), 1.0f), out(size_t(rows * N));
  for (auto _ : st) {
    kt->merge_columns(src.data(), lds, rows, cm, out.data(), N);
    benchmark::DoNotOptimize(out.data());
  }
  st.SetItemsProcessed(int64_t(st.iterations()) * rows * N);
}

void register_all() {
  struct Shape { int64_t M, N, K; };
  const Shape blocks[] = {{64, 64, 4096}, {1, 64, 8192}, {16, 64, 4096}, {128, 64, 384}};
  const int pairs[][2] = {{1, 1}, {1, 2}, {2, 2}, {4, 4}, {8, 1}, {8, 2}, {8, 3}, {8, 4}, {8, 8}};
  for (const auto& isa : supported_isas()) {
    const KernelTable* kt = table(isa);
    if (!kt) continue;
    for (const auto& s : blocks)
      for (const auto& pr : pairs) {
        const std::string shape = "/A" + std::to_string(pr[0]) + "W" + std::to_string(pr[1]) + "/M" +
                                  std::to_string(s.M) + "N" + std::to_string(s.N) + "K" + std::to_string(s.K);
        if (isa != "scalar" || s.M == 1)  // the scalar reference is slow; one shape is enough
          benchmark::RegisterBenchmark(("bitserial/" + isa + shape).c_str(), bm_bitserial, kt, pr[0], pr[1], s.M, s.N, s.K);
        if ((isa != "scalar" || s.M == 1) && kt->layout_gemm) {
          const bool gemv = s.M <= kt->layout_gemv_rows;
          benchmark::RegisterBenchmark(((gemv ? "layout_gemv/" : "layout_gemm/") + isa + shape).c_str(), bm_layout, kt,
                                       gemv, pr[0], pr[1], s.M, s.N, s.K);
        }
      }
    if (kt->layout_gemv && isa != "scalar")  // weights streamed from memory (64 MB at 8 bits), one thread
      for (int bits : {1, 2, 3, 4, 8})
        benchmark::RegisterBenchmark(("layout_gemv_mem/" + isa + "/A8W" + std::to_string(bits) + "/M1N8192K8192").c_str(),
                                     bm_layout, kt, true, 8, bits, 1, 8192, 8192);
    for (int bits : {1, 2, 4, 8}) {
      benchmark::RegisterBenchmark(("pack_planes/" + isa + "/b" + std::to_string(bits)).c_str(), bm_pack, kt, bits, 16, 4096);
      benchmark::RegisterBenchmark(("unpack_planes/" + isa + "/b" + std::to_string(bits)).c_str(), bm_unpack, kt, bits, 16, 4096);
    }
    for (int bits : {1, 2, 4, 8})
      benchmark::RegisterBenchmark(("quant_pack/" + isa + "/b" + std::to_string(bits)).c_str(), bm_quant_pack, kt, bits,
                                   4096);
    for (int64_t M : {1, 32})
      for (int th : {1, 2})
        benchmark::RegisterBenchmark(("quantize_pack/" + isa + "/M" + std::to_string(M) + "K4096/threads:" +
                                      std::to_string(th)).c_str(), bm_quantize_pack, isa, M, 4096, th)
            ->UseRealTime()->Unit(benchmark::kMicrosecond);
    for (int block : {16, 32, 128, 512})
      for (int64_t K : {384, 1536})
        if (K % block == 0)  // (a block must divide K)
          benchmark::RegisterBenchmark(("hadamard_row/" + isa + "/B" + std::to_string(block) + "K" +
                                        std::to_string(K)).c_str(), bm_hadamard, kt, block, K);
    benchmark::RegisterBenchmark(("gelu_row/" + isa + "/N1536").c_str(), bm_gelu, kt, int64_t(1536));
    for (int L : {12, 14})
      for (int bits : {4, 5})
        benchmark::RegisterBenchmark(("trellis_step/" + isa + "/L" + std::to_string(L) + "k" + std::to_string(bits)).c_str(),
                                     bm_trellis_step, kt, L, bits);
    for (int G : {2, 3})
      benchmark::RegisterBenchmark(("merge_columns/" + isa + "/tiers" + std::to_string(G) + "/M128N1536").c_str(),
                                   bm_merge, kt, G, 128, 1536);
    if (isa == "scalar") continue;
    const Shape layers[] = {{1, 8192, 8192}, {16, 4096, 4096}, {128, 1536, 384}, {2048, 2048, 2048}};
    for (const auto& s : layers)
      for (const auto& pr : pairs) {
        if (s.M == 2048 && !(pr[0] == pr[1] || pr[0] == 8)) continue;
        const std::string name = "mpgemm/" + isa + "/A" + std::to_string(pr[0]) + "W" + std::to_string(pr[1]) + "/M" +
                                 std::to_string(s.M) + "N" + std::to_string(s.N) + "K" + std::to_string(s.K) + "/threads:";
        for (int th : {1, 2})
          benchmark::RegisterBenchmark((name + std::to_string(th)).c_str(), bm_mpgemm, isa, pr[0], pr[1], s.M, s.N, s.K, th)
              ->UseRealTime()->Unit(benchmark::kMillisecond);
      }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const CpuFeatures& f = cpu_features();
  benchmark::AddCustomContext("cpu_model", f.brand);
  std::string isas;
  for (const auto& s : supported_isas()) isas += (isas.empty() ? "" : ",") + s;
  benchmark::AddCustomContext("soniq_isas", isas);
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
