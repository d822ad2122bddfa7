// Host entry points of the CUDA quantizer (plain C++ types; device pointers; stream is a
// cudaStream_t). dtype_bytes: 4 (float32) or 8 (float64). See cpp/quantize.h for the math.
#pragma once
#include <cstdint>

#include "../cpp/actpack.h"  // ActNoise

namespace soniq::cuda {

void quantize(int dtype_bytes, const void* x, int64_t outer, int64_t channels, int64_t inner, const void* scale,
              const void* lo, const void* hi, const void* alpha, int noise, uint64_t seed, bool values_only,
              void* out, void* stream);
void philox_uniform(int dtype_bytes, int64_t n, uint64_t seed, void* out, void* stream);

// Fused activation quantize + pack (cpp/actpack.h, word for word): x [M, K] float32 (row
// stride ldx), perm [K] int64, data [M * row words], sums [M][nsegs] and flags (one int) in
// device memory; segs [nsegs][3] (klen, kw, bits) and seg_scale [nsegs] on the HOST. sums
// and *flags must be zero on entry. A NaN in x sets flag bit 0 (its codes are 0) and, when
// nan_rows ([M], zero on entry) is given, nan_rows[row] = 1; a perm entry outside [0, K)
// sets bit 1: the caller raises (or, with nan_rows, makes those rows' outputs NaN). noise: as the CPU kernel (the same
// codes for the same seed). row_scale ([M], device, or null): per-token dynamic scales as
// the CPU's (cpp/actpack.h), written there. Throws std::invalid_argument for a malformed layout,
// std::runtime_error with the CUDA text for a failed launch.
void quantize_pack(const float* x, int64_t M, int64_t ldx, const int64_t* perm, int64_t K, int64_t nsegs,
                   const int64_t* segs, const float* seg_scale, bool is_signed, uint64_t* data, int64_t* sums,
                   int* flags, unsigned char* nan_rows, ActNoise noise, void* stream, float* row_scale = nullptr);

}  // namespace soniq::cuda
