// pybind11 module soniq._C. Tensors cross as raw pointers (uintptr_t) plus sizes; the
// Python layer validates arguments, owns the memory and keeps it alive for the call.
// Every kernel call releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "../cpp/build_info.h"
#include "../cpp/cpu_features.h"
#include "../cpp/dispatch.h"
#include "../cpp/layout_alloc.h"
#include "../cpp/mpgemm.h"
#include "../cpp/omp_borrow.h"
#include "../cpp/pack.h"
#include "../cpp/threadpool.h"
#include "../cpp/wlayout.h"
#include "registry.h"
#ifdef SONIQ_WITH_CUDA
#include "../cuda/cuda_api.h"
#endif

namespace py = pybind11;
using namespace soniq;

namespace {

template <class T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

struct LayoutBuffer {
  explicit LayoutBuffer(size_t bytes) : p(layout_alloc(bytes)), n(bytes) {}
  ~LayoutBuffer() { layout_free(p, n); }
  LayoutBuffer(const LayoutBuffer&) = delete;
  LayoutBuffer& operator=(const LayoutBuffer&) = delete;
  void* p;
  size_t n;
};

PackedOperand operand(uintptr_t data, int64_t rows, int64_t ngroups, uintptr_t desc, uintptr_t sums,
                      uintptr_t perm, bool is_signed) {
  return PackedOperand{ptr<const uint64_t>(data), rows, ngroups, ptr<const int64_t>(desc),
                       ptr<const int64_t>(sums), ptr<const int64_t>(perm), is_signed};
}

py::dict cpu_info() {
  const CpuFeatures& f = cpu_features();
  py::dict d;
  d["vendor"] = f.vendor;
  d["brand"] = f.brand;
  d["family"] = f.family;
  d["model"] = f.model;
  d["features"] = cpu_feature_names();
  return d;
}

}  // namespace

void soniq::bindings::register_core(py::module_& m) {
  m.def("cpu_info", &cpu_info);
  // the benchmarks' limits: the active path's inner-loop instructions timed on the calling
  // core (cpp/peak_probe.h); None where the path has no probe (scalar, AMX)
  m.def(
      "measure_peaks",
      [](double seconds) -> py::object {
        if (!(seconds > 0 && seconds <= 10)) throw std::invalid_argument("seconds must be in (0, 10], got " + std::to_string(seconds));
        const KernelTable& t = active_kernels();
        if (!t.peak_probe) return py::none();
        PeakRates r;
        {
          py::gil_scoped_release nogil;
          r = t.peak_probe(seconds);
        }
        py::dict d;
        d["isa"] = t.name;
        d["int8_macs_per_s"] = r.int8_macs;
        d["popcount_bits_per_s"] = r.popcount_bits;
        return d;
      },
      py::arg("seconds") = 0.2);
  m.def("compiler", &compiler_version);
  m.def("cuda_archs", &cuda_archs);
  m.def("compiled_isas", &compiled_isas);
  m.def("supported_isas", &supported_isas);
  m.def("emulated_isas", &emulated_isas);
#if defined(SONIQ_HAVE_X86_ISAS)
  m.def("layout_gemm_self_check", [](const std::string& isa) {  // for tests: the check AMX passes at dispatch
    std::string miss = missing_features(isa);
    const KernelTable* t = kernels_for(isa);
    if (!t || !miss.empty() || !t->layout_gemm || missing_features("avx512") != "")
      throw std::invalid_argument("isa '" + isa + "' has no runnable layout GEMM next to AVX-512 on this CPU");
    return layout_gemm_agrees_with_avx512(*t);
  }, py::arg("isa"));
#endif
  m.def("missing_features", &missing_features, py::arg("isa"));
  m.def("active_isa", &active_isa);
  // set_isa: bound in cpu_kernels.cpp (it checks the forced kernel path)
  m.def("default_num_threads", &default_num_threads);
  m.def("get_num_threads", &get_num_threads);
  m.def("set_num_threads", &set_num_threads, py::arg("n"), py::call_guard<py::gil_scoped_release>());
  m.def("thread_backend", &thread_backend);
  m.def("set_thread_backend", &set_thread_backend, py::arg("name"));
  m.def("openmp_library", &omp::library_path);
  // tests: which OS threads run a parallel job's tasks (each sleeps sleep_us; task throw_at throws)
  m.def("_parallel_tids",
        [](int64_t n, int sleep_us, int64_t throw_at) {
          std::vector<int64_t> tids(size_t(std::max<int64_t>(n, 0)));
          parallel_for(n, [&](int64_t i) {
            if (i == throw_at) throw std::runtime_error("task " + std::to_string(i) + " failed");
            std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
            tids[size_t(i)] = int64_t(syscall(SYS_gettid));
          });
          return tids;
        },
        py::arg("n"), py::arg("sleep_us") = 0, py::arg("throw_at") = -1, py::call_guard<py::gil_scoped_release>());
  // tests: how many times each task of a parallel job ran (once each, whatever the route and counts)
  m.def("_parallel_runs",
        [](int64_t n) {
          std::vector<std::atomic<int>> runs(size_t(std::max<int64_t>(n, 0)));
          parallel_for(n, [&](int64_t i) { runs[size_t(i)].fetch_add(1, std::memory_order_relaxed); });
          std::vector<int> out;
          for (const auto& r : runs) out.push_back(r.load());
          return out;
        },
        py::arg("n"), py::call_guard<py::gil_scoped_release>());

  // tests: the task order mpgemm gives parallel_for when its tasks differ in size
  m.def("_balanced_runs", &balanced_runs, py::arg("work"), py::arg("threads"));

  // cpp/code_encoding.h, the one definition Python's pack/unpack/range checks read
  m.def(
      "code_encoding",
      [](int bits, bool is_signed) {
        if (bits < 1 || bits > 8) throw std::invalid_argument("bits must be in 1..8, got " + std::to_string(bits));
        const CodeEncoding e = code_encoding(bits, is_signed);
        return py::make_tuple(e.alpha, e.offset, e.lo, e.hi);
      },
      py::arg("bits"), py::arg("signed"),
      "(alpha, offset, lo, hi) of the b-bit code encoding: value = alpha * code + offset, values lo..hi");

  m.def("pack_block",
        [](uintptr_t codes, int64_t rows, int64_t klen, int64_t ld, int bits, int64_t kw, uintptr_t out) {
          pack_block(ptr<const uint8_t>(codes), rows, klen, ld, bits, kw, ptr<uint64_t>(out));
        },
        py::call_guard<py::gil_scoped_release>());
  m.def("unpack_block",
        [](uintptr_t planes, int64_t rows, int64_t klen, int bits, int64_t kw, uintptr_t out, int64_t ld) {
          unpack_block(ptr<const uint64_t>(planes), rows, klen, bits, kw, ptr<uint8_t>(out), ld);
        },
        py::call_guard<py::gil_scoped_release>());

  auto mp = [](bool cuda, py::tuple A, py::tuple B, uintptr_t ksegs, int64_t nsegs, py::tuple S, int kind,
               uintptr_t out, uintptr_t stream, uintptr_t b_layout) {
    auto op = [](py::tuple t) {
      return operand(t[0].cast<uintptr_t>(), t[1].cast<int64_t>(), t[2].cast<int64_t>(), t[3].cast<uintptr_t>(),
                     t[4].cast<uintptr_t>(), t[5].cast<uintptr_t>(), t[6].cast<bool>());
    };
    PackedOperand a = op(A), b = op(B);
    Scales sc{ptr<const float>(S[0].cast<uintptr_t>()), ptr<const float>(S[1].cast<uintptr_t>()),
              ptr<const float>(S[2].cast<uintptr_t>()), ptr<const float>(S[3].cast<uintptr_t>())};
    if (kind < 0 || kind > 2) throw std::invalid_argument("kind must be 0 (int32), 1 (int64) or 2 (float32)");
    py::gil_scoped_release nogil;
    if (!cuda) {
      mpgemm(a, b, ptr<const int64_t>(ksegs), nsegs, sc, OutKind(kind), ptr<void>(out), ptr<const int8_t>(b_layout));
      return;
    }
#ifdef SONIQ_WITH_CUDA
    cuda::mpgemm(a, b, ptr<const int64_t>(ksegs), nsegs, sc, OutKind(kind), ptr<void>(out), ptr<void>(stream));
#else
    (void)stream;
    throw std::runtime_error("soniq was built without CUDA (SONIQ_CUDA=OFF or no nvcc at build time)");
#endif
  };
  m.def("mpgemm", [mp](py::tuple A, py::tuple B, uintptr_t ksegs, int64_t nsegs, py::tuple S, int kind,
                       uintptr_t out, uintptr_t b_layout) { mp(false, A, B, ksegs, nsegs, S, kind, out, 0, b_layout); });
  m.def("cuda_mpgemm", [mp](py::tuple A, py::tuple B, uintptr_t ksegs, int64_t nsegs, py::tuple S, int kind,
                            uintptr_t out, uintptr_t stream) { mp(true, A, B, ksegs, nsegs, S, kind, out, stream, 0); });

  // weight execution layout (cpp/wlayout.h): size, build from planes, planes back from it
  m.def("keep_planes_max_pairs", []() {  // the active ISA's: a packed layer keeps its weight's planes up to it
    return active_kernels().keep_planes_max_pairs;
  });
  m.def("layout_nbytes", [](uintptr_t desc, int64_t ngroups, uintptr_t ksegs, int64_t nsegs) {
    return layout_offsets(ptr<const int64_t>(desc), ngroups, ptr<const int64_t>(ksegs), nsegs).back();
  });
  // memory for a large layout (cpp/layout_alloc.h), as a writable buffer torch.frombuffer
  // wraps (the tensor keeps this object, and so the mapping, alive)
  py::class_<LayoutBuffer>(m, "LayoutBuffer", py::buffer_protocol()).def_buffer([](LayoutBuffer& b) {
    return py::buffer_info(b.p, 1, py::format_descriptor<int8_t>::format(), 1, {py::ssize_t(b.n)}, {py::ssize_t(1)});
  });
  m.def("layout_alloc", [](int64_t n) {
    if (n <= 0) throw std::invalid_argument("layout_alloc: n must be positive, got " + std::to_string(n));
    return std::make_unique<LayoutBuffer>(size_t(n));
  });
  m.def("layout_build",
        [](uintptr_t data, int64_t rows, int64_t ngroups, uintptr_t desc, uintptr_t ksegs, int64_t nsegs, uintptr_t out) {
          PackedOperand b{ptr<const uint64_t>(data), rows, ngroups, ptr<const int64_t>(desc), nullptr, nullptr, false};
          layout_build(b, ptr<const int64_t>(ksegs), nsegs, ptr<int8_t>(out));
        },
        py::call_guard<py::gil_scoped_release>());
  m.def("layout_to_planes",
        [](uintptr_t layout, uintptr_t desc, int64_t ngroups, uintptr_t ksegs, int64_t nsegs, uintptr_t data) {
          layout_to_planes(ptr<const int8_t>(layout), ptr<const int64_t>(desc), ngroups, ptr<const int64_t>(ksegs), nsegs,
                           ptr<uint64_t>(data));
        },
        py::call_guard<py::gil_scoped_release>());

#ifdef SONIQ_WITH_CUDA
  m.attr("built_with_cuda") = true;
  m.def("cuda_device_count", &cuda::device_count);
  m.def("cuda_error", &cuda::runtime_error_text);
#else
  m.attr("built_with_cuda") = false;
  m.def("cuda_device_count", []() { return 0; });
  m.def("cuda_error", []() { return std::string("built without CUDA"); });
#endif
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "soniq native core (torch-free)";
  soniq::bindings::register_core(m);
  soniq::bindings::register_cpu_kernels(m);
  soniq::bindings::register_quantize(m);
  soniq::bindings::register_actpack(m);
  soniq::bindings::register_linear(m);
  soniq::bindings::register_cuda(m);
}
