// Bindings for CPU kernel selection (tests and benchmarks force one block kernel).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "../cpp/mpgemm.h"
#include "registry.h"

namespace py = pybind11;

void soniq::bindings::register_cpu_kernels(py::module_& m) {
  m.def("set_kernel_path", [](const std::string& path) {
    if (path == "auto") soniq::set_kernel_path(soniq::KernelPath::Auto);
    else if (path == "bitserial") soniq::set_kernel_path(soniq::KernelPath::Bitserial);
    else if (path == "bytes") soniq::set_kernel_path(soniq::KernelPath::Bytes);
    else if (path == "lut") soniq::set_kernel_path(soniq::KernelPath::Lut);
    else throw std::invalid_argument("path must be 'auto', 'bitserial', 'bytes' or 'lut' (got '" + path + "')");
  }, py::arg("path"));
  m.def("get_kernel_path", []() {
    switch (soniq::get_kernel_path()) {
      case soniq::KernelPath::Bitserial: return std::string("bitserial");
      case soniq::KernelPath::Bytes: return std::string("bytes");
      case soniq::KernelPath::Lut: return std::string("lut");
      default: return std::string("auto");
    }
  });
}
