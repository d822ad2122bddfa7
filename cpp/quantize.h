// The per-channel quantizer (design.md sections 2 and 4): exact mode rounds to the nearest
// level and clamps; noise mode adds uniform noise of one quantization step (Philox keyed by
// seed and flat element index) instead of rounding. Torch-free; the CUDA kernel in
// cuda/quantize.cu computes the same values bit for bit.
#pragma once
#include <cstdint>

namespace soniq {

// Per-channel parameters, one entry per channel (length C). Values are v = x / scale
// mapped to the channel's integer grid: alpha = 1 (levels lo..hi step 1) or alpha = 2
// (signed 1-bit, levels {-1, +1}); noise mode uses v = clamp(x*inv + alpha*(u - 1/2)).
template <class T>
struct QuantParams {
  const T* scale;
  const T* lo;
  const T* hi;
  const T* alpha;
};

struct QuantShape {
  int64_t outer, channels, inner;  // x is contiguous [outer, channels, inner]
};

// out = v * scale (fake-quantized) or v itself (values_only). noise: 0 exact, 1 uniform.
template <class T>
void quantize(const T* x, const QuantShape& shape, const QuantParams<T>& p, int noise, uint64_t seed,
              bool values_only, T* out);

// u[i] in [0, 1) for i in [0, n): the noise stream of `seed` (for backward passes/tests).
template <class T>
void philox_uniform(int64_t n, uint64_t seed, T* out);

}  // namespace soniq
