// Exhaustive check of the rounding order kernels_avx512.cpp's WordCodes relies on (not run by
// pytest: ~15 s of one core). For every float32 t (NaN payloads, +-inf, +-0, ties included) and
// every code encoding, quantize.cpp's order -- clamp to [lo - 1, hi + 1], round half to even by
// the magic constant, clamp to [lo, hi], minus lo -- gives the same code as clamping to [lo, hi]
// and converting with vcvtps2dq's embedded round-to-nearest-even, minus lo. t is x * (1/s), or
// (t + 1) / 2 with the bounds [0, 1] for alpha 2; both orders share that step.
//   g++ -std=c++17 -O2 -ffp-contract=off -mavx512f -I. tests/native/round_order_check.cpp -o /tmp/roc && /tmp/roc
// Exit status 0 = no difference (needs an AVX-512 CPU).
#include <immintrin.h>

#include <cstdint>
#include <cstdio>
#include <initializer_list>

#include "cpp/code_encoding.h"

static __m512 clamp_ps(__m512 v, __m512 lo, __m512 hi) { return _mm512_min_ps(_mm512_max_ps(v, lo), hi); }

int main() {
  int64_t total = 0;
  for (int bits = 1; bits <= 8; ++bits)
    for (bool is_signed : {false, true}) {
      const soniq::CodeEncoding e = soniq::code_encoding(bits, is_signed);
      const bool a1 = e.alpha == 1;
      const float lo = a1 ? float(e.lo) : 0.0f, hi = a1 ? float(e.hi) : 1.0f;
      const __m512 M = _mm512_set1_ps(12582912.0f), flo = _mm512_set1_ps(lo), fhi = _mm512_set1_ps(hi);
      const __m512 wlo = _mm512_set1_ps(lo - 1.0f), whi = _mm512_set1_ps(hi + 1.0f);
      const __m512i ilo = _mm512_set1_epi32(int(lo)), iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      int64_t bad = 0;
      for (uint64_t u = 0; u < (uint64_t(1) << 32); u += 16) {
        const __m512 t = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_set1_epi32(int(uint32_t(u))), iota));
        const __m512 r = _mm512_sub_ps(_mm512_add_ps(clamp_ps(t, wlo, whi), M), M);
        const __m512i old_code = _mm512_cvttps_epi32(_mm512_sub_ps(clamp_ps(r, flo, fhi), flo));
        const __m512i new_code = _mm512_sub_epi32(
            _mm512_cvt_roundps_epi32(clamp_ps(t, flo, fhi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), ilo);
        const __mmask16 ne = _mm512_cmpneq_epi32_mask(old_code, new_code) |
                             _mm512_cmpgt_epu32_mask(new_code, _mm512_set1_epi32(255));
        if (ne && bad == 0) std::printf("  first difference near bits 0x%08x\n", unsigned(u));
        bad += __builtin_popcount(unsigned(ne));
      }
      std::printf("bits %d signed %d (alpha %d, codes of [%g, %g]): %lld differences\n", bits, int(is_signed),
                  int(e.alpha), double(e.lo), double(e.hi), (long long)bad);
      total += bad;
    }
  return total != 0;
}
