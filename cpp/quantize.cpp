// Scalar-per-element loops the compiler vectorizes (exact mode) and a thread pool over
// (outer, channel) rows. Compiled with -ffp-contract=off: x*inv + n must round twice,
// exactly as the CUDA kernel (explicit __fmul_rn/__fadd_rn) and the torch reference do.
#include "quantize.h"

#include <cmath>

#include "philox.h"
#include "threadpool.h"

namespace soniq {
namespace {

template <class T>
inline T clampv(T v, T lo, T hi) { return v < lo ? lo : (v > hi ? hi : v); }

template <class T>
void quantize_row(const T* x, int64_t n, T s, T lo, T hi, T alpha, int noise, uint64_t seed,
                  uint64_t base, bool values_only, T* out) {
  const T inv = T(1) / s;
  const T mul = values_only ? T(1) : s;
  if (noise) {
    for (int64_t j = 0; j < n; ++j) {
      const T u = T(philox::uniform_f32(seed, base + uint64_t(j)));
      const T t = x[j] * inv + alpha * (u - T(0.5));
      out[j] = clampv(t, lo, hi) * mul;
    }
  } else if (alpha == T(1)) {
    for (int64_t j = 0; j < n; ++j) out[j] = clampv(std::nearbyint(x[j] * inv), lo, hi) * mul;
  } else {  // signed 1-bit: code c = round((t + 1) / 2) in {0, 1}, value 2c - 1
    for (int64_t j = 0; j < n; ++j) {
      const T c = std::nearbyint((x[j] * inv + T(1)) * T(0.5));
      out[j] = clampv(c * T(2) - T(1), lo, hi) * mul;
    }
  }
}

}  // namespace

template <class T>
void quantize(const T* x, const QuantShape& sh, const QuantParams<T>& p, int noise, uint64_t seed,
              bool values_only, T* out) {
  const int64_t rows = sh.outer * sh.channels, n = sh.inner;
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
    for (int64_t j = t * chunk; j < j1; ++j) out[j] = T(philox::uniform_f32(seed, uint64_t(j)));
  });
}

template void quantize<float>(const float*, const QuantShape&, const QuantParams<float>&, int, uint64_t, bool,
                              float*);
template void quantize<double>(const double*, const QuantShape&, const QuantParams<double>&, int, uint64_t,
                               bool, double*);
template void philox_uniform<float>(int64_t, uint64_t, float*);
template void philox_uniform<double>(int64_t, uint64_t, double*);

}  // namespace soniq
