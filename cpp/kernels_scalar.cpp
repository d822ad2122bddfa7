// Portable baseline: the reference kernels, built with no ISA flags.
#include "kernels_ref.inl"

namespace soniq {

const KernelTable& kernels_scalar() {  // byte products on the weight execution layout, as the fast ISAs
  static const KernelTable t{"scalar", ref_bitserial, ref_pack_planes, ref_unpack_planes, ref_bytes_planes, 64, 64,
                             nullptr, nullptr, ref_quant_pack, nullptr, ref_layout_gemm, ref_layout_gemm, 4};
  return t;
}

const KernelTable& kernels_reference() {  // plane kernels (the reference of AVX2's byte path)
  static const KernelTable t{"reference", ref_bitserial, ref_pack_planes, ref_unpack_planes, ref_bytes_planes, 64, 64,
                             nullptr, nullptr, ref_quant_pack};
  return t;
}

}  // namespace soniq
