// AVX2 path (built with -mavx2 -mfma -mbmi2 -mpopcnt). Runs only when cpuid says so.
#include "kernels_ref.inl"

namespace soniq {

const KernelTable& kernels_avx2() {
  static const KernelTable t{"avx2", ref_bitserial, ref_pack_planes};
  return t;
}

}  // namespace soniq
