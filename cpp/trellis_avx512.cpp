// The trellis Viterbi step (cpp/trellis.h) on AVX-512: 16 states per vector; the same float
// operations as trellis_step_ref, so the same bits.
#include <immintrin.h>

#include "trellis.h"

namespace soniq {

void trellis_step_avx512(const float* cost, float* next, uint8_t* back, float* m, const float* values, float x, float w,
                         int states_log2, int bits) {
  const int64_t H = int64_t{1} << (states_log2 - bits), K = int64_t{1} << bits, S = H << bits;
  if (H < 16) return trellis_step_ref(cost, next, back, m, values, x, w, states_log2, bits);
  for (int64_t j = 0; j < H; j += 16) {
    __m512 best = _mm512_loadu_ps(cost + j);
    __m512i arg = _mm512_setzero_si512();
    for (int64_t h = 1; h < K; ++h) {
      const __m512 c = _mm512_loadu_ps(cost + h * H + j);
      const __mmask16 lt = _mm512_cmp_ps_mask(c, best, _CMP_LT_OQ);  // ties keep the smaller h
      best = _mm512_mask_mov_ps(best, lt, c);
      arg = _mm512_mask_mov_epi32(arg, lt, _mm512_set1_epi32(static_cast<int>(h)));
    }
    _mm512_storeu_ps(m + j, best);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(back + j), _mm512_cvtepi32_epi8(arg));
  }
  // next[s] = m[s >> bits] + w (x - values[s])^2, 16 states at a time: lane i takes m[(s0 + i) >> bits]
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i idx = _mm512_srlv_epi32(lane, _mm512_set1_epi32(bits));  // s0 is a multiple of 16
  const __m512 vx = _mm512_set1_ps(x), vw = _mm512_set1_ps(w);
  for (int64_t s0 = 0; s0 < S; s0 += 16) {
    const __m512 mv = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(m + (s0 >> bits)));
    const __m512 d = _mm512_sub_ps(vx, _mm512_loadu_ps(values + s0));
    _mm512_storeu_ps(next + s0, _mm512_add_ps(mv, _mm512_mul_ps(vw, _mm512_mul_ps(d, d))));
  }
}

}  // namespace soniq
