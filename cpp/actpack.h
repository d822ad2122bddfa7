// Fused activation quantize + pack (issue #4): float32 rows [M, K] -> the bit planes and
// code sums of a PackedTensor with per-K-column bits (axis=1, one row group), in one pass.
// Equal, word for word, to soniq.ops.pack(soniq.ops.quantize(x, ..., values_only=True)).
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

#include "host_device.h"

namespace soniq {

struct ActLayout {
  int64_t K;
  const int64_t* perm;      // [K]: packed K position -> original column
  int64_t nsegs;
  const int64_t* segs;      // [nsegs][3]: klen, kw (= ceil(klen/64)), bits (1..8)
  const float* seg_scale;   // [nsegs]: the quantization scale of each segment (finite, > 0)
};

// Words one row takes: sum over segments of bits * kw (data holds M times that).
int64_t act_row_words(const ActLayout& L);
// Throws std::invalid_argument unless row_words == act_row_words(L) (the caller sized data
// from it: a layout needing more words would write past it).
void check_row_words(const ActLayout& L, int64_t row_words);

// One K segment, checked, with the constants its codes are computed from (the CPU kernels
// and cuda/quantize_pack.cu use the same ones).
struct ActSegment {
  int64_t k0, klen, kw, word_off;  // word_off: where this segment's planes start in data / M
  int bits, alpha;
  float inv, lo, hi;
  float scale;  // the segment's (static) scale; inv = 1 / scale
};
// Checks L's segments and scales (not perm); throws std::invalid_argument naming the problem.
std::vector<ActSegment> act_segments(const ActLayout& L, bool is_signed);

// Optional noise (mode 1, uniform): each code is round_half_even(clamp(x/s + alpha*(u - 1/2),
// lo, hi)) with u the Philox draw ops.quantize(noise="uniform", seed) uses for the flat index
// r * K + column of x, i.e. ops.quantize's noisy values rounded: stochastic rounding.
struct ActNoise {
  int mode = 0;  // 0: none (round to nearest), 1: uniform
  uint64_t seed = 0;
};

// Per-token dynamic scales: a row's scale a is the largest |x| over its finite entries (NaN
// and +-inf skipped: an exact float32 max, so every order and device agrees), and segment s
// quantizes the row with the float32 scale scale_s * a (inverse 1 / (scale_s * a), each
// rounded once). When a is 0, or for some segment scale_s * a is 0 or inf or its inverse is
// inf, a is 1 (the static scale). Shared by the CPU and CUDA kernels.
// |v|'s bit pattern if v is finite, else 0 (NaN, +-inf). Non-negative floats order as their
// bit patterns (here non-negative int32), so the integer max of these over a row is its
// largest finite |x|, in a loop the compiler vectorizes with baseline SSE2 (a float max with
// NaN checks carried a dependency per element: 8 ns per element).
SONIQ_HD int32_t finite_abs_bits(float v) {
  int32_t u;
  memcpy(&u, &v, sizeof u);
  u &= 0x7fffffff;
  return u < 0x7f800000 ? u : 0;
}
SONIQ_HD float float_of_bits(int32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}
template <class Seg>
SONIQ_HD float dynamic_inv(const Seg& seg, float a) { return 1.0f / (seg.scale * a); }
template <class Seg>
SONIQ_HD float settle_row_scale(float a, const Seg* segs, int64_t nsegs) {
  if (a == 0.0f) return 1.0f;
  for (int64_t s = 0; s < nsegs; ++s) {
    const float sa = segs[s].scale * a;
    if (!(sa > 0.0f && sa <= 3.40282347e38f && dynamic_inv(segs[s], a) <= 3.40282347e38f)) return 1.0f;
  }
  return a;
}

// x: row r at x + r*ldx, unit column stride. data: segment s's planes [bits][M][kw] at
// offset M * (words of segments before s); sums: [M][nsegs]. Throws std::invalid_argument
// on a malformed layout, or on a NaN in x (naming its position) unless nan_rows is given:
// then nan_rows[r] = 1 if row r holds a NaN (its codes are then unspecified), else 0 --
// for callers that make such rows' outputs NaN, as a float layer would. row_scale ([M] or
// null): per-token dynamic mode, row r's scale a (dynamic_row_scale) is written there; the
// caller multiplies the row's output by it (mpgemm's per-row scale of A).
void quantize_pack(const float* x, int64_t M, int64_t ldx, const ActLayout& L, bool is_signed, uint64_t* data,
                   int64_t* sums, ActNoise noise = {}, uint8_t* nan_rows = nullptr, float* row_scale = nullptr);

}  // namespace soniq
