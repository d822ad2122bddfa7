// CUDA-only bindings beyond the core mpgemm entry point: kernel choice (tests,
// benchmarks, and the Python-driven cuBLAS INT8 path), the code expansion kernel and the
// fused activation quantize + pack.
// Built with or without CUDA (without, the calls say so).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "registry.h"
#ifdef SONIQ_WITH_CUDA
#include "../cpp/actpack.h"
#include "../cuda/cuda_api.h"
#include "../cuda/quantize_api.h"
#endif

namespace py = pybind11;

#ifdef SONIQ_WITH_CUDA
namespace {

// (data, rows, ngroups, desc, sums, perm, signed) as in module.cpp; desc on the host
soniq::PackedOperand operand(const py::tuple& t) {
  auto p = [&](int i) { return t[i].cast<uintptr_t>(); };
  return soniq::PackedOperand{reinterpret_cast<const uint64_t*>(p(0)), t[1].cast<int64_t>(), t[2].cast<int64_t>(),
                              reinterpret_cast<const int64_t*>(p(3)), reinterpret_cast<const int64_t*>(p(4)),
                              reinterpret_cast<const int64_t*>(p(5)), t[6].cast<bool>()};
}

}  // namespace
#endif

void soniq::bindings::register_cuda(py::module_& m) {
#ifdef SONIQ_WITH_CUDA
  m.def("cuda_set_kernel", &soniq::cuda::set_kernel, py::arg("name"),
        "Force the CUDA mpgemm kernel: 'auto', 'ref', 'popc', 'gemv', 'mma', 'mma4', 'bmma' or 'int8mm' (process-wide).");
  m.def("cuda_get_kernel", &soniq::cuda::get_kernel);
  m.def("cuda_choose_kernel", [](py::tuple A, py::tuple B, uintptr_t ksegs, int64_t nsegs) {
    return soniq::cuda::choose_kernel(operand(A), operand(B), reinterpret_cast<const int64_t*>(ksegs), nsegs);
  });
  m.def("cuda_expand_codes",
        [](uintptr_t planes, int bits, int64_t rows, int64_t kw, int64_t klen, uintptr_t out, int64_t rows_pad,
           int64_t kpad, uintptr_t stream) {
          soniq::cuda::expand_codes(reinterpret_cast<const uint64_t*>(planes), bits, rows, kw, klen,
                                    reinterpret_cast<void*>(out), rows_pad, kpad, reinterpret_cast<void*>(stream));
        },
        py::call_guard<py::gil_scoped_release>());
  // x, perm, data, sums, flags: device pointers; segs, seg_scale: host (see quantize_api.h)
  m.def("cuda_quantize_pack",
        [](uintptr_t x, int64_t M, int64_t ldx, uintptr_t perm, int64_t K, uintptr_t segs, int64_t nsegs,
           uintptr_t seg_scale, bool is_signed, int64_t row_words, uintptr_t data, uintptr_t sums, uintptr_t flags,
           uintptr_t nan_rows, int noise, uint64_t seed, uintptr_t stream, uintptr_t row_scale) {
          const auto* segs_h = reinterpret_cast<const int64_t*>(segs);
          soniq::check_row_words(soniq::ActLayout{K, nullptr, nsegs, segs_h, reinterpret_cast<const float*>(seg_scale)},
                                 row_words);
          soniq::cuda::quantize_pack(reinterpret_cast<const float*>(x), M, ldx, reinterpret_cast<const int64_t*>(perm),
                                     K, nsegs, segs_h, reinterpret_cast<const float*>(seg_scale), is_signed,
                                     reinterpret_cast<uint64_t*>(data), reinterpret_cast<int64_t*>(sums),
                                     reinterpret_cast<int*>(flags), reinterpret_cast<unsigned char*>(nan_rows),
                                     soniq::ActNoise{noise, seed}, reinterpret_cast<void*>(stream),
                                     reinterpret_cast<float*>(row_scale));
        },
        py::call_guard<py::gil_scoped_release>());
#else
  auto none = [](py::args) -> py::object {
    throw std::runtime_error("soniq was built without CUDA (SONIQ_CUDA=OFF or no nvcc at build time)");
  };
  m.def("cuda_set_kernel", none);
  m.def("cuda_get_kernel", []() { return std::string("none"); });
  m.def("cuda_choose_kernel", none);
  m.def("cuda_expand_codes", none);
  m.def("cuda_quantize_pack", none);
#endif
}
