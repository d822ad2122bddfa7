// Binding of the fused activation quantize + pack (cpp/actpack.h). Pointers arrive as
// integers from python/soniq/ops/_library.py, which checks dtypes and shapes.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "../cpp/actpack.h"
#include "registry.h"

namespace py = pybind11;

void soniq::bindings::register_actpack(py::module_& m) {
  m.def("quantize_pack",
        [](uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t perm, uintptr_t segs, int64_t nsegs,
           uintptr_t seg_scale, bool is_signed, int64_t row_words, uintptr_t data, uintptr_t sums, int noise,
           uint64_t seed, uintptr_t nan_rows, uintptr_t row_scale) {
          soniq::ActLayout L{K, reinterpret_cast<const int64_t*>(perm), nsegs, reinterpret_cast<const int64_t*>(segs),
                             reinterpret_cast<const float*>(seg_scale)};
          py::gil_scoped_release nogil;
          soniq::check_row_words(L, row_words);
          soniq::quantize_pack(reinterpret_cast<const float*>(x), M, ldx, L, is_signed,
                               reinterpret_cast<uint64_t*>(data), reinterpret_cast<int64_t*>(sums),
                               soniq::ActNoise{noise, seed}, reinterpret_cast<uint8_t*>(nan_rows),
                               reinterpret_cast<float*>(row_scale));
        });
}
