// Bindings of the quantizer (cpp/quantize.h, cuda/quantize.cu). Pointers arrive as
// integers from python/soniq/ops/_quantize.py, which validates shapes and dtypes.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "../cpp/quantize.h"
#include "registry.h"
#ifdef SONIQ_WITH_CUDA
#include "../cuda/quantize_api.h"
#endif

namespace py = pybind11;

namespace {

template <class T>
void run_cpu(uintptr_t x, int64_t outer, int64_t channels, int64_t inner, uintptr_t scale, uintptr_t lo,
             uintptr_t hi, uintptr_t alpha, int noise, uint64_t seed, bool values_only, uintptr_t out) {
  soniq::QuantParams<T> p{reinterpret_cast<const T*>(scale), reinterpret_cast<const T*>(lo),
                          reinterpret_cast<const T*>(hi), reinterpret_cast<const T*>(alpha)};
  soniq::quantize<T>(reinterpret_cast<const T*>(x), soniq::QuantShape{outer, channels, inner}, p, noise, seed,
                     values_only, reinterpret_cast<T*>(out));
}

}  // namespace

void soniq::bindings::register_quantize(py::module_& m) {
  m.def("quantize",
        [](bool cuda, int dtype_bytes, uintptr_t x, int64_t outer, int64_t channels, int64_t inner, uintptr_t scale,
           uintptr_t lo, uintptr_t hi, uintptr_t alpha, int noise, uint64_t seed, bool values_only, uintptr_t out,
           uintptr_t stream) {
          if (dtype_bytes != 4 && dtype_bytes != 8) throw std::invalid_argument("dtype_bytes must be 4 or 8");
          py::gil_scoped_release nogil;
          if (cuda) {
#ifdef SONIQ_WITH_CUDA
            soniq::cuda::quantize(dtype_bytes, reinterpret_cast<const void*>(x), outer, channels, inner,
                                  reinterpret_cast<const void*>(scale), reinterpret_cast<const void*>(lo),
                                  reinterpret_cast<const void*>(hi), reinterpret_cast<const void*>(alpha), noise,
                                  seed, values_only, reinterpret_cast<void*>(out), reinterpret_cast<void*>(stream));
            return;
#else
            (void)stream;
            throw std::runtime_error("soniq was built without CUDA (SONIQ_CUDA=OFF or no nvcc at build time)");
#endif
          }
          if (dtype_bytes == 4) run_cpu<float>(x, outer, channels, inner, scale, lo, hi, alpha, noise, seed, values_only, out);
          else run_cpu<double>(x, outer, channels, inner, scale, lo, hi, alpha, noise, seed, values_only, out);
        });
  m.def("philox_uniform", [](bool cuda, int dtype_bytes, int64_t n, uint64_t seed, uintptr_t out, uintptr_t stream) {
    py::gil_scoped_release nogil;
    if (cuda) {
#ifdef SONIQ_WITH_CUDA
      soniq::cuda::philox_uniform(dtype_bytes, n, seed, reinterpret_cast<void*>(out), reinterpret_cast<void*>(stream));
      return;
#else
      (void)stream;
      throw std::runtime_error("soniq was built without CUDA");
#endif
    }
    if (dtype_bytes == 4) soniq::philox_uniform<float>(n, seed, reinterpret_cast<float*>(out));
    else soniq::philox_uniform<double>(n, seed, reinterpret_cast<double*>(out));
  });
}
