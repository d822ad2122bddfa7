// AVX2 kernels over the weight execution layout (cpp/wlayout.h); defined in
// kernels_avx2_layout.cpp (AVX2 flags), called only through kernels_avx2()'s table.
#pragma once
#include <cstdint>

#include "kernels.h"

namespace soniq::avx2 {

// LayoutGemmFn (cpp/kernels.h): few A rows, weights streamed once and decoded in registers
void layout_gemv(const uint8_t* A, int64_t lda, int64_t M, const int8_t* L, int bits, int64_t N, int64_t kw,
                 int64_t* C, int64_t ldc, int shift, const int64_t* rowterm, const int64_t* colterm,
                 const LayoutEpilogue* ep);
// LayoutGemmFn: many A rows; per 64 columns all of K decoded once into a buffer, int32
// accumulators over all of K, stored as int64 totals or through the float epilogue (ep)
void layout_gemm(const uint8_t* A, int64_t lda, int64_t M, const int8_t* L, int bits, int64_t N, int64_t kw,
                 int64_t* C, int64_t ldc, int shift, const int64_t* rowterm, const int64_t* colterm,
                 const LayoutEpilogue* ep);

}  // namespace soniq::avx2
