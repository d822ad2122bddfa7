#include "hadamard.h"

namespace soniq {

bool hadamard_block_fits(int64_t block, int64_t k) {
  return block >= 2 && (block & (block - 1)) == 0 && k > 0 && k % block == 0;
}

void hadamard_row_ref(const float* x, int64_t k, int block, float* out) {
  for (int64_t j = 0; j < k; ++j) out[j] = x[j];
  for (int64_t h = 1; h < block; h *= 2)
    for (int64_t g = 0; g < k; g += 2 * h)
      for (int64_t j = g; j < g + h; ++j) {
        const float a = out[j], b = out[j + h];
        out[j] = a + b;
        out[j + h] = a - b;
      }
}

}  // namespace soniq
