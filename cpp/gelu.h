#pragma once
// The exact (erf) GELU applied in place to a packed layer's float32 output (the Linear +
// GELU of Transformer feed-forward blocks, fused by python/soniq/_fuse.py):
//   gelu(x) = h + h * erf(a),  h = 0.5f * x,  a = x * 0.70710678f  (each a float32 multiply)
// erf(a): N. Juffa's faithfully rounded single-precision erff (max error < 1 ulp; two
// branches split at |a| = 0.927734375), its exp(r <= 0) a Cephes-style polynomial with
// r clamped at -87 (so 2^n stays normal) and 2^n built from its exponent bits (AVX-512
// scales by 2^n with vscalefps: the same value, p * 2^n rounded once).
// Every ISA version (gelu_row_ref here, AVX2, AVX-512) runs these float operations on every
// element in this order, with the same fused multiply-adds and no other contraction, so all
// give the same bits. Within ~2e-7 * |x| of the float64 GELU: closer than torch's CPU gelu,
// whose erf is Abramowitz-Stegun 7.1.26 (error up to 1.5e-7 in erf).
#include <cstdint>

namespace soniq {

using GeluRowFn = void (*)(float* x, int64_t n);

namespace gelu_coef {
constexpr float kHalf = 0.5f, kRsqrt2 = 0.70710678f, kSplit = 0.927734375f;
// |a| <= kSplit: erf(a) = a + a * p(a^2), p by Horner from s0
constexpr float s0 = -5.96761703e-4f, s1 = 4.99119423e-3f, s2 = -2.67681349e-2f, s3 = 1.12819925e-1f,
                s4 = -3.76125336e-1f, s5 = 1.28379166e-1f;
// |a| > kSplit: erf(a) = sign(a) * (1 - exp(r(|a|)))
constexpr float b0 = -1.72853470e-5f, b1 = 3.83197126e-4f, b2 = -3.88396438e-3f, b3 = 2.42546219e-2f,
                b4 = -1.06777877e-1f, b5 = -6.34846687e-1f, b6 = -1.28717512e-1f;
// exp(r), r in [-87, 0]: n = rint(r * log2e), f = r - n * ln2 (two parts), 2^n * (1 + f + f^2 q(f))
constexpr float kExpMin = -87.0f, kLog2e = 1.44269504f, kLn2Hi = 0.693145752f, kLn2Lo = 1.42860677e-6f;
constexpr float e0 = 1.98756912e-4f, e1 = 1.39819994e-3f, e2 = 8.33345205e-3f, e3 = 4.16657962e-2f,
                e4 = 1.66666657e-1f, e5 = 0.5f;
}  // namespace gelu_coef

// The portable loop: the reference every ISA version is tested against.
void gelu_row_ref(float* x, int64_t n);

}  // namespace soniq
