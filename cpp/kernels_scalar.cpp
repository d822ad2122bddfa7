// Portable baseline: the reference kernels, built with no ISA flags.
#include "kernels_ref.inl"

namespace soniq {

namespace {

KernelTable reference_table(const char* name) {  // plane kernels
  KernelTable k;
  k.name = name;
  k.bitserial = ref_bitserial;
  k.pack_planes = ref_pack_planes;
  k.unpack_planes = ref_unpack_planes;
  k.bitserial_max_pairs = 64;
  k.bitserial_max_pairs_gemv = 64;
  k.keep_planes_max_pairs = 64;
  k.quant_pack = ref_quant_pack;
  k.merge_columns = ref_merge_columns;
  return k;
}

}  // namespace

const KernelTable& kernels_scalar() {  // byte products on the weight execution layout, as the fast ISAs
  static const KernelTable t = [] {
    KernelTable k = reference_table("scalar");
    k.layout_gemv = ref_layout_gemm;
    k.layout_gemm = ref_layout_gemm;
    k.layout_gemv_rows = 4;
    k.quant_bytes = ref_quant_bytes;
    return k;
  }();
  return t;
}

}  // namespace soniq
