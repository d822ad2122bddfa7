// Scalar-per-element loops the compiler vectorizes (exact mode) and a thread pool over
// (outer, channel) rows. Compiled with -ffp-contract=off: x*inv + n must round twice,
// exactly as the CUDA kernel (explicit __fmul_rn/__fadd_rn) and the torch reference do.
#include "quantize.h"


#include "philox.h"
#include "rounding.h"
#include "threadpool.h"

namespace soniq {
namespace {

template <class T>
void quantize_row(const T* x, int64_t n, T s, T lo, T hi, T alpha, int noise, uint64_t seed,
                  uint64_t base, bool values_only, T* out) {
  const T inv = T(1) / s;
  const T mul = values_only ? T(1) : s;
  if (noise) {
    uint32_t words[4];
    uint64_t cached = ~uint64_t(0);
    for (int64_t j = 0; j < n; ++j) {
      const uint64_t idx = base + uint64_t(j);
      if ((idx >> 2) != cached) philox::block_words(seed, cached = idx >> 2, words);  // 4 draws per block
      const T u = T(philox::to_uniform(words[idx & 3]));
      const T t = x[j] * inv + alpha * (u - T(0.5));
      out[j] = clampv(t, lo, hi) * mul;
    }
  } else if (alpha == T(1)) {
    // round-half-even by the magic constant after clamping t to [lo-1, hi+1] (|t| <= 257, far
    // below 2^22, so (t + M) - M is exact): same result as nearbyint, and the loop vectorizes
    const T lo1 = lo - T(1), hi1 = hi + T(1), M = magic<T>();
    for (int64_t j = 0; j < n; ++j) out[j] = clampv((clampv(x[j] * inv, lo1, hi1) + M) - M, lo, hi) * mul;
  } else {  // signed 1-bit: code c = round((t + 1) / 2) in {0, 1}, value 2c - 1
    const T M = magic<T>();
    for (int64_t j = 0; j < n; ++j) {
      const T c = (clampv((x[j] * inv + T(1)) * T(0.5), T(-2), T(3)) + M) - M;
      out[j] = clampv(c * T(2) - T(1), lo, hi) * mul;
    }
  }
}

}  // namespace

template <class T>
void quantize(const T* x, const QuantShape& sh, const QuantParams<T>& p, int noise, uint64_t seed,
              bool values_only, T* out) {
  const int64_t rows = sh.outer * sh.channels, n = sh.inner;
  if (rows <= 0 || n <= 0) return;  // empty tensor: nothing to do (and no division by n)
  const int64_t chunk = n >= 4096 ? 1 : (4096 + n - 1) / n;  // rows per task: ~4K elements
  parallel_for((rows + chunk - 1) / chunk, [&](int64_t t) {
    const int64_t r1 = (t + 1) * chunk < rows ? (t + 1) * chunk : rows;
    for (int64_t r = t * chunk; r < r1; ++r) {
      const int64_t c = r % sh.channels;
      quantize_row(x + r * n, n, p.scale[c], p.lo[c], p.hi[c], p.alpha[c], noise, seed, uint64_t(r * n),
                   values_only, out + r * n);
    }
  });
}

template <class T>
void philox_uniform(int64_t n, uint64_t seed, T* out) {
  const int64_t chunk = 8192;
  parallel_for((n + chunk - 1) / chunk, [&](int64_t t) {
    const int64_t j1 = (t + 1) * chunk < n ? (t + 1) * chunk : n;
    uint32_t words[4];
    for (int64_t j = t * chunk; j < j1; ++j) {
      if (j == t * chunk || (j & 3) == 0) philox::block_words(seed, uint64_t(j) >> 2, words);
      out[j] = T(philox::to_uniform(words[j & 3]));
    }
  });
}

template void quantize<float>(const float*, const QuantShape&, const QuantParams<float>&, int, uint64_t, bool,
                              float*);
template void quantize<double>(const double*, const QuantShape&, const QuantParams<double>&, int, uint64_t,
                               bool, double*);
template void philox_uniform<float>(int64_t, uint64_t, float*);
template void philox_uniform<double>(int64_t, uint64_t, double*);

}  // namespace soniq
