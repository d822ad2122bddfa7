// The trellis Viterbi step (cpp/trellis.h) on AVX2: 8 states per vector; the same float
// operations as trellis_step_ref, so the same bits.
#include <immintrin.h>

#include "trellis.h"

namespace soniq {

void trellis_step_avx2(const float* cost, float* next, uint8_t* back, float* m, const float* values, float x, float w,
                       int states_log2, int bits) {
  const int64_t H = int64_t{1} << (states_log2 - bits), K = int64_t{1} << bits, S = H << bits;
  if (H < 8) return trellis_step_ref(cost, next, back, m, values, x, w, states_log2, bits);
  const __m128i bytes = _mm_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  for (int64_t j = 0; j < H; j += 8) {
    __m256 best = _mm256_loadu_ps(cost + j);
    __m256i arg = _mm256_setzero_si256();
    for (int64_t h = 1; h < K; ++h) {
      const __m256 c = _mm256_loadu_ps(cost + h * H + j);
      const __m256 lt = _mm256_cmp_ps(c, best, _CMP_LT_OQ);  // ties keep the smaller h
      best = _mm256_blendv_ps(best, c, lt);
      arg = _mm256_blendv_epi8(arg, _mm256_set1_epi32(static_cast<int>(h)), _mm256_castps_si256(lt));
    }
    _mm256_storeu_ps(m + j, best);
    // the low byte of each 32-bit index, 8 bytes out
    const __m128i lo = _mm_shuffle_epi8(_mm256_castsi256_si128(arg), bytes);
    const __m128i hi = _mm_shuffle_epi8(_mm256_extracti128_si256(arg, 1), bytes);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(back + j), _mm_unpacklo_epi32(lo, hi));
  }
  // next[s] = m[s >> bits] + w (x - values[s])^2, 8 states at a time: lane i takes m[(s0 + i) >> bits]
  const __m256i idx = _mm256_srlv_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bits));  // s0: a multiple of 8
  const __m256 vx = _mm256_set1_ps(x), vw = _mm256_set1_ps(w);
  for (int64_t s0 = 0; s0 < S; s0 += 8) {
    const __m256 mv = _mm256_permutevar8x32_ps(_mm256_loadu_ps(m + (s0 >> bits)), idx);
    const __m256 d = _mm256_sub_ps(vx, _mm256_loadu_ps(values + s0));
    _mm256_storeu_ps(next + s0, _mm256_add_ps(mv, _mm256_mul_ps(vw, _mm256_mul_ps(d, d))));
  }
}

}  // namespace soniq
