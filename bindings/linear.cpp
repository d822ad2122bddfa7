// Binding of the packed Linear layer's fused CPU forward (cpp/linear.h). Pointers arrive as
// integers from python/soniq/_packed_nn.py, which checks dtypes and shapes; the plan copies
// everything but the weight layout, which the module keeps alive beside it.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "../cpp/dispatch.h"
#include "../cpp/gelu.h"
#include "../cpp/hadamard.h"
#include "../cpp/linear.h"
#include "../cpp/trellis.h"
#include "registry.h"

namespace py = pybind11;

namespace {
template <class T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }
}  // namespace

void soniq::bindings::register_linear(py::module_& m) {
  // rows [M, K] (float32, contiguous) -> out: each row rotated by the active ISA's kernel (the
  // fused forward's quantize pass), for the tests against python/soniq/_hadamard.py
  m.def("hadamard_rows", [](uintptr_t x, int64_t M, int64_t K, int block, uintptr_t out) {
    if (M < 0 || !soniq::hadamard_block_fits(block, K))
      throw std::invalid_argument("hadamard_rows: block must be a power of two >= 2 dividing K");
    const soniq::KernelTable& kt = soniq::active_kernels();
    const soniq::HadamardRowFn f = kt.hadamard_row ? kt.hadamard_row : soniq::hadamard_row_ref;
    for (int64_t r = 0; r < M; ++r) f(ptr<const float>(x) + r * K, K, block, ptr<float>(out) + r * K);
  });
  // x [n] (float32, contiguous) in place: the exact GELU of cpp/gelu.h on the active ISA's
  // kernel (PackedLinear's fused activation where the fused forward does not run; the tests)
  m.def("gelu_", [](uintptr_t x, int64_t n) {
    if (n < 0) throw std::invalid_argument("gelu_: n must be >= 0");
    const soniq::KernelTable& kt = soniq::active_kernels();
    (kt.gelu_row ? kt.gelu_row : soniq::gelu_row_ref)(ptr<float>(x), n);
  }, py::call_guard<py::gil_scoped_release>());
  // x [R, T] (float32, contiguous), bits [T] (uint8), w [T] (float32; 0: all 1), values [2^L]
  // (float32) -> states [R, T] (int64): the least-squares trellis paths (cpp/trellis.h) on the
  // active ISA's step; python/soniq/_trellis.py checks the arguments
  m.def("trellis_viterbi", [](uintptr_t x, int64_t R, int64_t T, int states_log2, uintptr_t bits, uintptr_t w,
                              uintptr_t values, uintptr_t states) {
    const soniq::KernelTable& kt = soniq::active_kernels();
    soniq::trellis_viterbi(ptr<const float>(x), R, T, states_log2, ptr<const uint8_t>(bits), ptr<const float>(w),
                           ptr<const float>(values), ptr<int64_t>(states),
                           kt.trellis_step ? kt.trellis_step : soniq::trellis_step_ref);
  }, py::call_guard<py::gil_scoped_release>());
  py::class_<soniq::LinearPlan>(m, "LinearPlan")
      .def(py::init([](int64_t K, uintptr_t perm, uintptr_t segs, int64_t nsegs, uintptr_t seg_scale, bool a_signed,
                       uintptr_t out_seg_scale, bool dynamic, int64_t N, int64_t ngroups, uintptr_t w_desc,
                       uintptr_t w_sums, uintptr_t w_perm, bool w_signed, uintptr_t ksegs, uintptr_t w_layout,
                       uintptr_t w_row_scale, uintptr_t bias, uintptr_t inv_smooth, int hadamard_block) {
        const soniq::ActLayout act{K, ptr<const int64_t>(perm), nsegs, ptr<const int64_t>(segs),
                                   ptr<const float>(seg_scale)};
        const soniq::PackedOperand w{nullptr, N, ngroups, ptr<const int64_t>(w_desc), ptr<const int64_t>(w_sums),
                                     ptr<const int64_t>(w_perm), w_signed};
        return new soniq::LinearPlan(act, a_signed, ptr<const float>(out_seg_scale), dynamic, w,
                                     ptr<const int64_t>(ksegs), ptr<const int8_t>(w_layout),
                                     ptr<const float>(w_row_scale), ptr<const float>(bias),
                                     ptr<const float>(inv_smooth), hadamard_block);
      }))
      .def("forward",
           [](const soniq::LinearPlan& p, uintptr_t x, int64_t M, int64_t ldx, uintptr_t out, bool gelu) {
             return p.forward(ptr<const float>(x), M, ldx, ptr<float>(out), gelu);
           },
           py::arg("x"), py::arg("M"), py::arg("ldx"), py::arg("out"), py::arg("gelu") = false,
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("in_features", &soniq::LinearPlan::in_features)
      .def_property_readonly("out_features", &soniq::LinearPlan::out_features)
      .def_property_readonly("smoothed", &soniq::LinearPlan::smoothed)
      .def_property_readonly("hadamard_block", &soniq::LinearPlan::hadamard_block);
}
