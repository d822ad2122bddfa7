#include "dispatch.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <vector>

#include "cpu_features.h"
#include "kernels_amx.h"

namespace soniq {

const KernelTable* kernels_for(const std::string& isa) {
  if (isa == "scalar") return &kernels_scalar();
#if defined(SONIQ_HAVE_X86_ISAS)
  if (isa == "avx2") return &kernels_avx2();
  if (isa == "avx512") return &kernels_avx512();
  if (isa == "amx_emu") return &kernels_amx_emu();
#endif
#if defined(SONIQ_HAVE_AMX)
  if (isa == "amx") return &kernels_amx();
#endif
  return nullptr;
}

#if defined(SONIQ_HAVE_X86_ISAS)
// A table's layout GEMM against the AVX-512 one on random operands (integer totals, 4- and
// 8-bit weights, a tail strip). Run once before AMX is offered: on a mismatch the CPU keeps
// the AVX-512 path instead of giving wrong outputs.
bool layout_gemm_agrees_with_avx512(const KernelTable& t) {
  uint64_t state = 0x9E3779B97F4A7C15ull;
  auto next = [&] {  // xorshift64
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return uint8_t(state >> 24);
  };
  const int64_t M = 45, N = 70, kw = 4, ntiles = (N + 15) / 16;
  for (int bits : {4, 8}) {
    std::vector<uint8_t> a(size_t(M * kw * 64));
    std::vector<int8_t> lay(size_t(ntiles * 2 * kw * bits * 64));
    for (auto& v : a) v = next();
    for (auto& v : lay) v = int8_t(next());
    std::vector<int64_t> want(size_t(M * N), 0), got(size_t(M * N), 0);
    kernels_avx512().layout_gemm(a.data(), kw * 64, M, lay.data(), bits, N, kw, want.data(), N, 0, nullptr, nullptr,
                                 nullptr);
    t.layout_gemm(a.data(), kw * 64, M, lay.data(), bits, N, kw, got.data(), N, 0, nullptr, nullptr, nullptr);
    if (got != want) return false;
  }
  return true;
}
#endif

namespace {

#if defined(SONIQ_HAVE_AMX)
bool amx_agrees_with_avx512() {
  static const bool ok = layout_gemm_agrees_with_avx512(kernels_amx());
  return ok;
}
#endif

std::atomic<const KernelTable*>& current() {
  static std::atomic<const KernelTable*> t{nullptr};
  return t;
}

const KernelTable* choose_default() {
  // SONIQ_ISA is read once; a bad value falls back to detection here and is
  // reported by the Python package at import (where it can raise cleanly).
  if (const char* env = std::getenv("SONIQ_ISA")) {
    std::string isa(env);
    if (!isa.empty() && isa != "auto" && kernels_for(isa) && missing_features(isa).empty())
      return kernels_for(isa);
  }
  auto isas = supported_isas();
  return kernels_for(isas.back());
}

}  // namespace

std::vector<std::string> compiled_isas() {
#if defined(SONIQ_HAVE_AMX)
  return {"scalar", "avx2", "avx512", "amx"};
#elif defined(SONIQ_HAVE_X86_ISAS)
  return {"scalar", "avx2", "avx512"};
#else
  return {"scalar"};
#endif
}

std::vector<std::string> emulated_isas() {
#if defined(SONIQ_HAVE_X86_ISAS)
  if (missing_features("avx512").empty()) return {"amx_emu"};
#endif
  return {};
}

std::string missing_features(const std::string& isa) {
  const CpuFeatures& f = cpu_features();
  std::string miss;
  auto need = [&](bool have, const char* name) {
    if (!have) miss += (miss.empty() ? "" : ", ") + std::string(name);
  };
  if (isa == "scalar") return "";
  if (isa == "amx_emu") return missing_features("avx512");  // the emulation runs on AVX-512
  if (isa != "avx2" && isa != "avx512" && isa != "amx") return "unknown ISA";
  need(f.avx2, "avx2");
  need(f.fma, "fma");
  need(f.bmi2, "bmi2");
  need(f.popcnt, "popcnt");
  if (isa == "avx512" || isa == "amx") {
    need(f.avx512f, "avx512f");
    need(f.avx512bw, "avx512bw");
    need(f.avx512vl, "avx512vl");
    need(f.avx512dq, "avx512dq");
    need(f.avx512vnni, "avx512_vnni");
    need(f.avx512vpopcntdq, "avx512_vpopcntdq");
  }
  if (isa == "amx") {
    need(f.amx_tile && f.os_amx, "amx_tile");
    need(f.amx_int8, "amx_int8");
    if (miss.empty()) need(amx_permitted(), "amx tile-data permission (arch_prctl ARCH_REQ_XCOMP_PERM)");
#if defined(SONIQ_HAVE_AMX)
    if (miss.empty()) need(amx_agrees_with_avx512(), "amx self-check (the tile kernel disagreed with AVX-512)");
#endif
  }
  return miss;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const auto& isa : compiled_isas())
    if (missing_features(isa).empty()) out.push_back(isa);
  return out;
}

const KernelTable& active_kernels() {
  const KernelTable* t = current().load(std::memory_order_acquire);
  if (!t) {
    t = choose_default();
    current().store(t, std::memory_order_release);
  }
  return *t;
}

std::string active_isa() { return active_kernels().name; }

void set_isa(const std::string& isa) {
  const KernelTable* t = kernels_for(isa);
  if (!t) {
    std::string names;
    for (const auto& n : compiled_isas()) names += (names.empty() ? "" : ", ") + n;
    throw std::invalid_argument("isa must be one of " + names + " (got '" + isa + "')");
  }
  std::string miss = missing_features(isa);
  if (!miss.empty())
    throw std::invalid_argument("isa '" + isa + "' is not supported by this CPU (missing: " +
                                miss + ")");
  current().store(t, std::memory_order_release);
}

}  // namespace soniq
