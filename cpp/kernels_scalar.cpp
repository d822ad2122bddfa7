// Portable baseline: the reference kernels, built with no ISA flags.
#include "kernels_ref.inl"

namespace soniq {

const KernelTable& kernels_scalar() {
  static const KernelTable t{"scalar", ref_bitserial, ref_pack_planes};
  return t;
}

}  // namespace soniq
