// Host entry points of the CUDA quantizer (plain C++ types; device pointers; stream is a
// cudaStream_t). dtype_bytes: 4 (float32) or 8 (float64). See cpp/quantize.h for the math.
#pragma once
#include <cstdint>

namespace soniq::cuda {

void quantize(int dtype_bytes, const void* x, int64_t outer, int64_t channels, int64_t inner, const void* scale,
              const void* lo, const void* hi, const void* alpha, int noise, uint64_t seed, bool values_only,
              void* out, void* stream);
void philox_uniform(int dtype_bytes, int64_t n, uint64_t seed, void* out, void* stream);

}  // namespace soniq::cuda
