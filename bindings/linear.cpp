// Binding of the packed Linear layer's fused CPU forward (cpp/linear.h). Pointers arrive as
// integers from python/soniq/_packed_nn.py, which checks dtypes and shapes; the plan copies
// everything but the weight layout, which the module keeps alive beside it.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "../cpp/linear.h"
#include "registry.h"

namespace py = pybind11;

namespace {
template <class T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }
}  // namespace

void soniq::bindings::register_linear(py::module_& m) {
  py::class_<soniq::LinearPlan>(m, "LinearPlan")
      .def(py::init([](int64_t K, uintptr_t perm, uintptr_t segs, int64_t nsegs, uintptr_t seg_scale, bool a_signed,
                       uintptr_t out_seg_scale, bool dynamic, int64_t N, int64_t ngroups, uintptr_t w_desc,
                       uintptr_t w_sums, uintptr_t w_perm, bool w_signed, uintptr_t ksegs, uintptr_t w_layout,
                       uintptr_t w_row_scale, uintptr_t bias, uintptr_t inv_smooth) {
        const soniq::ActLayout act{K, ptr<const int64_t>(perm), nsegs, ptr<const int64_t>(segs),
                                   ptr<const float>(seg_scale)};
        const soniq::PackedOperand w{nullptr, N, ngroups, ptr<const int64_t>(w_desc), ptr<const int64_t>(w_sums),
                                     ptr<const int64_t>(w_perm), w_signed};
        return new soniq::LinearPlan(act, a_signed, ptr<const float>(out_seg_scale), dynamic, w,
                                     ptr<const int64_t>(ksegs), ptr<const int8_t>(w_layout),
                                     ptr<const float>(w_row_scale), ptr<const float>(bias),
                                     ptr<const float>(inv_smooth));
      }))
      .def("forward",
           [](const soniq::LinearPlan& p, uintptr_t x, int64_t M, int64_t ldx, uintptr_t out) {
             return p.forward(ptr<const float>(x), M, ldx, ptr<float>(out));
           },
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("in_features", &soniq::LinearPlan::in_features)
      .def_property_readonly("out_features", &soniq::LinearPlan::out_features)
      .def_property_readonly("smoothed", &soniq::LinearPlan::smoothed);
}
