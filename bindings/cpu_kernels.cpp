// Bindings for CPU kernel selection (tests and benchmarks force one block kernel).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // kernel_paths returns a std::vector<std::string>

#include <cstdint>
#include <random>
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
  // For tests: one call of `isa`'s bit-serial kernel against the scalar reference, on random
  // planes and a C started at random values (the kernel adds into it), with a guard column
  // past N in every row and a guard row past M. Returns the number of C cells that differ
  // (guards included). Reaches the block contract directly: the driver only ever hands the
  // kernel tiles of at most 64 columns inside a 64-column buffer.
  m.def("bitserial_mismatches", [](const std::string& isa, int64_t M, int64_t N, int64_t kw, int pa, int pb,
                                   int shift, uint64_t seed) {
    const soniq::KernelTable* t = soniq::kernels_for(isa);
    const soniq::KernelTable* ref = soniq::kernels_for("scalar");
    if (!t || !soniq::missing_features(isa).empty())
      throw std::invalid_argument("isa '" + isa + "' cannot run on this CPU");
    if (M < 1 || N < 1 || kw < 1 || pa < 1 || pa > 8 || pb < 1 || pb > 8 || shift < 0 || shift > 2)
      throw std::invalid_argument("bitserial_mismatches: M, N, kw >= 1, planes 1..8, shift 0..2");
    std::mt19937_64 rng(seed);
    std::vector<uint64_t> A(size_t(pa * M * kw)), B(size_t(pb * N * kw));
    for (auto& w : A) w = rng();
    for (auto& w : B) w = rng();
    const int64_t ldc = N + 1;
    std::vector<int64_t> want(size_t((M + 1) * ldc));
    for (auto& c : want) c = int64_t(rng() >> 20);
    std::vector<int64_t> got = want;
    ref->bitserial(A.data(), pa, M * kw, M, B.data(), pb, N * kw, N, kw, want.data(), ldc, shift);
    t->bitserial(A.data(), pa, M * kw, M, B.data(), pb, N * kw, N, kw, got.data(), ldc, shift);
    int64_t bad = 0;
    for (size_t i = 0; i < got.size(); ++i) bad += got[i] != want[i];
    return bad;
  }, py::arg("isa"), py::arg("M"), py::arg("N"), py::arg("kw"), py::arg("pa"), py::arg("pb"), py::arg("shift"),
     py::arg("seed"));
  m.def("get_kernel_path", []() {
    switch (soniq::get_kernel_path()) {
      case soniq::KernelPath::Bitserial: return std::string("bitserial");
      case soniq::KernelPath::Bytes: return std::string("bytes");
      default: return std::string("auto");
    }
  });
}
