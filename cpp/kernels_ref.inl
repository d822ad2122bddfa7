// Reference kernels, included by each ISA translation unit. Internal linkage
// (anonymous namespace) so a copy built with AVX-512 flags can never be picked by
// the linker for the scalar table.
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace {

inline int popcount64(uint64_t x) { return __builtin_popcountll(x); }

inline void ref_bitserial(const uint64_t* A, int pa, int64_t a_plane_stride, int64_t M,
                   const uint64_t* B, int pb, int64_t b_plane_stride, int64_t N, int64_t kw,
                   int64_t* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      int64_t acc = 0;
      for (int p = 0; p < pa; ++p) {
        const uint64_t* a = A + p * a_plane_stride + i * kw;
        for (int q = 0; q < pb; ++q) {
          const uint64_t* b = B + q * b_plane_stride + j * kw;
          int64_t s = 0;
          for (int64_t w = 0; w < kw; ++w) s += popcount64(a[w] & b[w]);
          acc += s << (p + q);
        }
      }
      C[i * ldc + j] = acc;
    }
  }
}

inline void ref_pack_planes(const uint8_t* codes, int64_t rows, int64_t klen, int64_t ld, int bits,
                     int64_t kw, uint64_t* out) {
  std::memset(out, 0, sizeof(uint64_t) * size_t(bits) * size_t(rows) * size_t(kw));
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = codes + r * ld;
    for (int64_t k = 0; k < klen; ++k) {
      const uint64_t c = row[k];
      const int64_t w = k >> 6;
      const int sh = int(k & 63);
      for (int p = 0; p < bits; ++p) out[(int64_t(p) * rows + r) * kw + w] |= ((c >> p) & 1u) << sh;
    }
  }
}

inline void ref_unpack_planes(const uint64_t* planes, int bits, int64_t plane_stride, int64_t rows, int64_t kw,
                       uint8_t* out, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < kw * 64; ++k) {
      unsigned c = 0;
      for (int p = 0; p < bits; ++p)
        c |= unsigned((planes[p * plane_stride + r * kw + (k >> 6)] >> (k & 63)) & 1u) << p;
      out[r * ldo + k] = uint8_t(c);
    }
}

inline void ref_bytes_planes(const uint8_t* A, int64_t lda, int64_t M, const uint64_t* B, int pb,
                      int64_t b_plane_stride, int64_t N, int64_t kw, int64_t* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      int64_t acc = 0;
      for (int64_t k = 0; k < kw * 64; ++k) {
        int64_t c = 0;
        for (int p = 0; p < pb; ++p) c |= int64_t((B[p * b_plane_stride + j * kw + (k >> 6)] >> (k & 63)) & 1u) << p;
        acc += int64_t(A[i * lda + k]) * c;
      }
      C[i * ldc + j] = acc;
    }
}

}  // namespace
