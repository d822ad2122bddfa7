// CUDA-only bindings beyond the core mpgemm entry point: kernel choice for tests and
// benchmarks. Built with or without CUDA (without, the calls say so).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "registry.h"
#ifdef SONIQ_WITH_CUDA
#include "../cuda/cuda_api.h"
#endif

namespace py = pybind11;

void soniq::bindings::register_cuda(py::module_& m) {
#ifdef SONIQ_WITH_CUDA
  m.def("cuda_set_kernel", &soniq::cuda::set_kernel, py::arg("name"),
        "Force the CUDA mpgemm kernel: 'auto', 'ref', 'popc', 'gemv', 'mma' or 'bmma' (process-wide).");
  m.def("cuda_get_kernel", &soniq::cuda::get_kernel);
#else
  m.def("cuda_set_kernel", [](const std::string&) {
    throw std::runtime_error("soniq was built without CUDA (SONIQ_CUDA=OFF or no nvcc at build time)");
  }, py::arg("name"));
  m.def("cuda_get_kernel", []() { return std::string("none"); });
#endif
}
