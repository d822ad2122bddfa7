#include "trellis.h"

#include <limits>
#include <stdexcept>
#include <vector>

#include "threadpool.h"

namespace soniq {

void trellis_step_ref(const float* cost, float* next, uint8_t* back, float* m, const float* values, float x,
                      float w, int states_log2, int bits) {
  const int64_t H = int64_t{1} << (states_log2 - bits), K = int64_t{1} << bits;
  for (int64_t j = 0; j < H; ++j) {
    float best = cost[j];
    int arg = 0;
    for (int64_t h = 1; h < K; ++h)
      if (cost[h * H + j] < best) best = cost[h * H + j], arg = static_cast<int>(h);
    m[j] = best;
    back[j] = static_cast<uint8_t>(arg);
  }
  for (int64_t s = 0; s < (H << bits); ++s) {
    const float d = x - values[s];
    next[s] = m[s >> bits] + w * (d * d);
  }
}

void trellis_viterbi(const float* x, int64_t R, int64_t T, int states_log2, const uint8_t* bits, const float* w,
                     const float* values, int64_t* states, TrellisStepFn step) {
  if (states_log2 < 1 || states_log2 > 16 || R < 0 || T < 1)
    throw std::invalid_argument("trellis_viterbi: need 1 <= states_log2 <= 16, R >= 0, T >= 1");
  std::vector<int64_t> off(static_cast<size_t>(T), 0);  // where step t's back pointers start
  for (int64_t t = 0; t < T; ++t) {
    if (bits[t] < 1 || bits[t] > 8 || bits[t] > states_log2)
      throw std::invalid_argument("trellis_viterbi: need 1 <= bits[t] <= min(8, states_log2)");
    if (t + 1 < T) off[t + 1] = off[t] + (int64_t{1} << (states_log2 - bits[t + 1]));
  }
  const int64_t S = int64_t{1} << states_log2, K0 = int64_t{1} << bits[0];
  const float w0 = w ? w[0] : 1.0f;
  parallel_for(R, [&](int64_t r) {
    const float* xr = x + r * T;
    std::vector<float> a(S), b(S), m(S + 16);
    std::vector<uint8_t> back(static_cast<size_t>(off[T - 1]));
    for (int64_t s = 0; s < S; ++s) {
      const float d = xr[0] - values[s];
      a[s] = s < K0 ? w0 * (d * d) : std::numeric_limits<float>::infinity();
    }
    float* cost = a.data();
    float* next = b.data();
    for (int64_t t = 1; t < T; ++t) {
      step(cost, next, back.data() + off[t - 1], m.data(), values, xr[t], w ? w[t] : 1.0f, states_log2, bits[t]);
      std::swap(cost, next);
    }
    int64_t s = 0;
    for (int64_t i = 1; i < S; ++i)
      if (cost[i] < cost[s]) s = i;
    int64_t* out = states + r * T;
    for (int64_t t = T - 1; t >= 0; --t) {
      out[t] = s;
      if (t) {
        const int64_t low = s >> bits[t];
        s = (int64_t{back[off[t - 1] + low]} << (states_log2 - bits[t])) | low;
      }
    }
  });
}

}  // namespace soniq
