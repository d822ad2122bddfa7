// Portable baseline: the reference kernels, built with no ISA flags.
#include "kernels_ref.inl"

namespace soniq {

const KernelTable& kernels_scalar() {
  static const KernelTable t{"scalar", ref_bitserial, ref_pack_planes, ref_unpack_planes, ref_bytes_planes, 64, 64,
                             nullptr, nullptr, ref_quant_pack};
  return t;
}

const KernelTable& kernels_reference() {
  static const KernelTable t{"reference", ref_bitserial, ref_pack_planes, ref_unpack_planes, ref_bytes_planes, 64, 64,
                             nullptr, nullptr, ref_quant_pack};
  return t;
}

}  // namespace soniq
