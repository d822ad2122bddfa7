// Bindings for CPU kernel selection (tests and benchmarks force one block kernel).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // kernel_paths returns a std::vector<std::string>

#include <stdexcept>
#include <string>
#include <vector>

#include "../cpp/dispatch.h"
#include "../cpp/kernels.h"
#include "../cpp/mpgemm.h"
#include "registry.h"

namespace py = pybind11;

void soniq::bindings::register_cpu_kernels(py::module_& m) {
  m.def("set_kernel_path", [](const std::string& path) {
    if (path == "auto") soniq::set_kernel_path(soniq::KernelPath::Auto);
    else if (path == "bitserial") soniq::set_kernel_path(soniq::KernelPath::Bitserial);
    else if (path == "bytes") soniq::set_kernel_path(soniq::KernelPath::Bytes);
    else throw std::invalid_argument("path must be 'auto', 'bitserial' or 'bytes' (got '" + path + "')");
  }, py::arg("path"));
  // every ISA has every path (the byte path runs on the weight-layout kernels)
  m.def("kernel_paths", []() { return std::vector<std::string>{"auto", "bitserial", "bytes"}; });
  m.def("set_isa", [](const std::string& isa) { soniq::set_isa(isa); }, py::arg("isa"));
  m.def("get_kernel_path", []() {
    switch (soniq::get_kernel_path()) {
      case soniq::KernelPath::Bitserial: return std::string("bitserial");
      case soniq::KernelPath::Bytes: return std::string("bytes");
      default: return std::string("auto");
    }
  });
}
