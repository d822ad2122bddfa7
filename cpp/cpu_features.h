// CPU feature detection (cpuid + XCR0): what the processor has and the OS enables.
#pragma once
#include <string>
#include <vector>

namespace soniq {

struct CpuFeatures {
  std::string vendor, brand;
  int family = 0, model = 0;  // CPUID leaf 1, extended fields folded in (AMD Zen 4: 25, Zen 5: 26)
  bool popcnt = false, avx = false, avx2 = false, fma = false, bmi2 = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512vnni = false, avx512vpopcntdq = false, avx512bf16 = false, avxvnni = false;
  bool amx_tile = false, amx_int8 = false, amx_bf16 = false;
  bool os_avx = false, os_avx512 = false, os_amx = false;  // XCR0 state enabled by the OS
};

const CpuFeatures& cpu_features();
// Linux: this process may use the AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM, asked once,
// on first call; false without AMX in CPUID/XCR0, on other systems, or when the kernel refuses).
bool amx_permitted();
std::vector<std::string> cpu_feature_names();  // the flags that are set, for info()

}  // namespace soniq
