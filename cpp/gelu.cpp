#include "gelu.h"

#include <cmath>
#include <cstring>

namespace soniq {

namespace {

using namespace gelu_coef;

float exp_neg(float r) {  // exp(max(r, -87)) for r <= 0, as the vector versions compute it
  r = std::fmax(r, kExpMin);
  const float n = std::nearbyint(r * kLog2e);
  float f = std::fma(-n, kLn2Hi, r);
  f = std::fma(-n, kLn2Lo, f);
  float p = std::fma(e0, f, e1);
  p = std::fma(p, f, e2);
  p = std::fma(p, f, e3);
  p = std::fma(p, f, e4);
  p = std::fma(p, f, e5);
  p = std::fma(p, f * f, f + 1.0f);
  const uint32_t bits = uint32_t(int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

float gelu_one(float x) {
  const float a = x * kRsqrt2, t = std::fabs(a), s = a * a;
  float r;
  if (t > kSplit) {
    float q = std::fma(b0, t, b1);
    const float u = std::fma(b2, t, b3);
    q = std::fma(q, s, u);
    q = std::fma(q, t, b4);
    q = std::fma(q, t, b5);
    q = std::fma(q, t, b6);
    q = std::fma(q, t, -t);
    r = std::copysign(1.0f - exp_neg(q), a);
  } else {  // (and NaN)
    r = std::fma(s0, s, s1);
    r = std::fma(r, s, s2);
    r = std::fma(r, s, s3);
    r = std::fma(r, s, s4);
    r = std::fma(r, s, s5);
    r = std::fma(r, a, a);
  }
  const float h = x * kHalf;
  return std::fma(h, r, h);
}

}  // namespace

void gelu_row_ref(float* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = gelu_one(x[j]);
}

}  // namespace soniq
