// Bindings for CPU kernel selection (tests and benchmarks force one block kernel).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include <vector>

#include "../cpp/dispatch.h"
#include "../cpp/kernels.h"
#include "../cpp/mpgemm.h"
#include "registry.h"

namespace py = pybind11;

namespace {

// The paths the active ISA's kernel table has: a forced path is refused where it is
// missing, never run as another one (the table path exists on AVX2 only).
std::vector<std::string> kernel_paths() {
  std::vector<std::string> out{"auto", "bitserial", "bytes"};
  if (soniq::active_kernels().lut_planes) out.push_back("lut");
  return out;
}

void require_path_on_active_isa(const std::string& path) {
  for (const auto& p : kernel_paths())
    if (p == path) return;
  throw std::invalid_argument("kernel path '" + path + "' needs the table-lookup kernels, which the active ISA '" +
                              soniq::active_isa() + "' lacks (they exist for avx2); choose 'auto', 'bitserial' or "
                              "'bytes', or set_isa('avx2') first");
}

}  // namespace

void soniq::bindings::register_cpu_kernels(py::module_& m) {
  m.def("set_kernel_path", [](const std::string& path) {
    if (path == "auto") soniq::set_kernel_path(soniq::KernelPath::Auto);
    else if (path == "bitserial") soniq::set_kernel_path(soniq::KernelPath::Bitserial);
    else if (path == "bytes") soniq::set_kernel_path(soniq::KernelPath::Bytes);
    else if (path == "lut") {
      require_path_on_active_isa(path);
      soniq::set_kernel_path(soniq::KernelPath::Lut);
    } else throw std::invalid_argument("path must be 'auto', 'bitserial', 'bytes' or 'lut' (got '" + path + "')");
  }, py::arg("path"));
  m.def("kernel_paths", &kernel_paths);
  // set_isa refuses an ISA that lacks the forced kernel path (instead of silently running another)
  m.def("set_isa", [](const std::string& isa) {
    const std::string old = soniq::active_isa();
    soniq::set_isa(isa);
    if (soniq::get_kernel_path() == soniq::KernelPath::Lut && !soniq::active_kernels().lut_planes) {
      soniq::set_isa(old);
      throw std::invalid_argument("isa '" + isa + "' has no table-lookup kernels but kernel path 'lut' is forced; "
                                  "call set_kernel_path('auto') first");
    }
  }, py::arg("isa"));
  m.def("get_kernel_path", []() {
    switch (soniq::get_kernel_path()) {
      case soniq::KernelPath::Bitserial: return std::string("bitserial");
      case soniq::KernelPath::Bytes: return std::string("bytes");
      case soniq::KernelPath::Lut: return std::string("lut");
      default: return std::string("auto");
    }
  });
}
