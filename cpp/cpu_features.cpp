#include "cpu_features.h"

#include <cstdint>
#include <cstring>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <cpuid.h>
#define SONIQ_X86 1
#endif

namespace soniq {
namespace {

#if SONIQ_X86
void cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
  __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
}

// xgetbv is only legal when OSXSAVE is set; the caller checks that first.
uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile(".byte 0x0f, 0x01, 0xd0" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned r[4];
  cpuid(0, 0, r);
  unsigned max_leaf = r[0];
  char vendor[13] = {0};
  std::memcpy(vendor, &r[1], 4);
  std::memcpy(vendor + 4, &r[3], 4);
  std::memcpy(vendor + 8, &r[2], 4);
  f.vendor = vendor;

  cpuid(0x80000000u, 0, r);
  if (r[0] >= 0x80000004u) {
    char brand[49] = {0};
    for (unsigned i = 0; i < 3; ++i) {
      cpuid(0x80000002u + i, 0, r);
      std::memcpy(brand + 16 * i, r, 16);
    }
    f.brand = brand;
    while (!f.brand.empty() && f.brand.back() == ' ') f.brand.pop_back();
    while (!f.brand.empty() && f.brand.front() == ' ') f.brand.erase(f.brand.begin());
  }

  cpuid(1, 0, r);
  const unsigned base_family = (r[0] >> 8) & 0xf, base_model = (r[0] >> 4) & 0xf;
  f.family = int(base_family == 0xf ? base_family + ((r[0] >> 20) & 0xff) : base_family);
  f.model = int(base_family == 0xf || base_family == 0x6 ? (((r[0] >> 16) & 0xf) << 4) | base_model : base_model);
  const bool osxsave = r[2] & (1u << 27);
  f.popcnt = r[2] & (1u << 23);
  f.fma = r[2] & (1u << 12);
  f.f16c = r[2] & (1u << 29);
  const bool cpu_avx = r[2] & (1u << 28);
  uint64_t xcr0 = osxsave ? xgetbv0() : 0;
  f.os_avx = (xcr0 & 0x6) == 0x6;             // XMM + YMM state
  f.os_avx512 = f.os_avx && (xcr0 & 0xe0) == 0xe0;  // opmask + ZMM_Hi256 + Hi16_ZMM
  f.os_amx = (xcr0 & 0x60000) == 0x60000;     // XTILECFG + XTILEDATA
  f.avx = cpu_avx && f.os_avx;
  if (!f.os_avx) f.fma = f.f16c = false;

  if (max_leaf >= 7) {
    cpuid(7, 0, r);
    const unsigned b = r[1], c = r[2], d = r[3];
    f.avx2 = f.avx && (b & (1u << 5));
    f.bmi2 = b & (1u << 8);
    if (f.os_avx512) {
      f.avx512f = b & (1u << 16);
      f.avx512dq = b & (1u << 17);
      f.avx512bw = b & (1u << 30);
      f.avx512vl = b & (1u << 31);
      f.avx512vnni = c & (1u << 11);
      f.avx512vpopcntdq = c & (1u << 14);
    }
    if (f.os_amx) {
      f.amx_bf16 = d & (1u << 22);
      f.amx_tile = d & (1u << 24);
      f.amx_int8 = d & (1u << 25);
    }
    cpuid(7, 1, r);
    f.avxvnni = f.avx && (r[0] & (1u << 4));
    f.avx512bf16 = f.os_avx512 && (r[0] & (1u << 5));
  }
  return f;
}
#else
CpuFeatures detect() { return CpuFeatures{}; }
#endif

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

std::vector<std::string> cpu_feature_names() {
  const CpuFeatures& f = cpu_features();
  std::vector<std::string> out;
  auto add = [&](bool on, const char* name) { if (on) out.emplace_back(name); };
  add(f.popcnt, "popcnt");
  add(f.avx, "avx");
  add(f.avx2, "avx2");
  add(f.fma, "fma");
  add(f.bmi2, "bmi2");
  add(f.f16c, "f16c");
  add(f.avxvnni, "avx_vnni");
  add(f.avx512f, "avx512f");
  add(f.avx512dq, "avx512dq");
  add(f.avx512bw, "avx512bw");
  add(f.avx512vl, "avx512vl");
  add(f.avx512vnni, "avx512_vnni");
  add(f.avx512vpopcntdq, "avx512_vpopcntdq");
  add(f.avx512bf16, "avx512_bf16");
  add(f.amx_tile, "amx_tile");
  add(f.amx_int8, "amx_int8");
  add(f.amx_bf16, "amx_bf16");
  return out;
}

bool amx_permitted() {
  static const bool ok = [] {
    const CpuFeatures& f = cpu_features();
    if (!(f.amx_tile && f.amx_int8 && f.os_amx)) return false;
#if defined(__linux__) && defined(SYS_arch_prctl)
    // Linux 5.16+: tile data is enabled per process on request (else TILELOADD faults)
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return ok;
}

}  // namespace soniq
