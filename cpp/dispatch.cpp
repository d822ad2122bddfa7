#include "dispatch.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#include "cpu_features.h"

namespace soniq {

const KernelTable* kernels_for(const std::string& isa) {
  if (isa == "scalar") return &kernels_scalar();
#if defined(SONIQ_HAVE_X86_ISAS)
  if (isa == "avx2") return &kernels_avx2();
  if (isa == "avx512") return &kernels_avx512();
#endif
  return nullptr;
}

namespace {

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
#if defined(SONIQ_HAVE_X86_ISAS)
  return {"scalar", "avx2", "avx512"};
#else
  return {"scalar"};
#endif
}

std::string missing_features(const std::string& isa) {
  const CpuFeatures& f = cpu_features();
  std::string miss;
  auto need = [&](bool have, const char* name) {
    if (!have) miss += (miss.empty() ? "" : ", ") + std::string(name);
  };
  if (isa == "scalar") return "";
  if (isa != "avx2" && isa != "avx512") return "unknown ISA";
  need(f.avx2, "avx2");
  need(f.fma, "fma");
  need(f.bmi2, "bmi2");
  need(f.popcnt, "popcnt");
  if (isa == "avx512") {
    need(f.avx512f, "avx512f");
    need(f.avx512bw, "avx512bw");
    need(f.avx512vl, "avx512vl");
    need(f.avx512dq, "avx512dq");
    need(f.avx512vnni, "avx512_vnni");
    need(f.avx512vpopcntdq, "avx512_vpopcntdq");
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
