// The code encoding (design.md section 2), the one definition the C++ core, the CUDA kernels
// and Python (soniq._C.code_encoding) share: a b-bit value v is stored as the unsigned code
// u in [0, 2^b - 1] with v = alpha * u + offset. Unsigned: v = u. Signed: two's-complement
// range [-2^(b-1), 2^(b-1) - 1], except signed 1-bit, which is {-1, +1} (alpha 2).
#pragma once
#include <cstdint>

#include "host_device.h"

namespace soniq {

struct CodeEncoding {
  int64_t alpha;   // 1, or 2 for signed 1-bit
  int64_t offset;  // the value of code 0
  int64_t lo, hi;  // the values of codes 0 and 2^b - 1 (the inclusive range)
};

// bits in 1..8
SONIQ_HD constexpr CodeEncoding code_encoding(int bits, bool is_signed) {
  const int64_t alpha = is_signed && bits == 1 ? 2 : 1;
  const int64_t offset = !is_signed ? 0 : bits == 1 ? -1 : -(int64_t(1) << (bits - 1));
  return {alpha, offset, offset, alpha * ((int64_t(1) << bits) - 1) + offset};
}

}  // namespace soniq
