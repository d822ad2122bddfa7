#include "trellis.h"

#include <limits>
#include <stdexcept>
#include <vector>

#include "threadpool.h"

namespace soniq {

void trellis_step_ref(const float* cost, float* next, uint8_t* back, float* m, const float* values, float x,
                      int states_log2, int bits) {
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
    next[s] = m[s >> bits] + d * d;
  }
}

void trellis_viterbi(const float* x, int64_t R, int64_t T, int states_log2, int bits, const float* values,
                     int64_t* states, TrellisStepFn step) {
  if (states_log2 < 1 || states_log2 > 16 || bits < 1 || bits > 8 || bits > states_log2 || R < 0 || T < 1)
    throw std::invalid_argument("trellis_viterbi: need 1 <= bits <= min(8, states_log2), states_log2 <= 16, R >= 0, T >= 1");
  const int64_t S = int64_t{1} << states_log2, K = int64_t{1} << bits, H = S >> bits;
  parallel_for(R, [&](int64_t r) {
    const float* xr = x + r * T;
    std::vector<float> a(S), b(S), m(H + 16);
    std::vector<uint8_t> back(static_cast<size_t>((T - 1) * H));
    for (int64_t s = 0; s < S; ++s) {
      const float d = xr[0] - values[s];
      a[s] = s < K ? d * d : std::numeric_limits<float>::infinity();
    }
    float* cost = a.data();
    float* next = b.data();
    for (int64_t t = 1; t < T; ++t) {
      step(cost, next, back.data() + (t - 1) * H, m.data(), values, xr[t], states_log2, bits);
      std::swap(cost, next);
    }
    int64_t s = 0;
    for (int64_t i = 1; i < S; ++i)
      if (cost[i] < cost[s]) s = i;
    int64_t* out = states + r * T;
    for (int64_t t = T - 1; t >= 0; --t) {
      out[t] = s;
      if (t) {
        const int64_t low = s >> bits;
        s = (int64_t{back[(t - 1) * H + low]} << (states_log2 - bits)) | low;
      }
    }
  });
}

}  // namespace soniq
