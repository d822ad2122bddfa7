// AVX-512 path (F/BW/VL/DQ/VNNI/VPOPCNTDQ flags). Runs only when cpuid + XCR0 say so.
#include "kernels_ref.inl"

namespace soniq {

const KernelTable& kernels_avx512() {
  static const KernelTable t{"avx512", ref_bitserial, ref_pack_planes};
  return t;
}

}  // namespace soniq
