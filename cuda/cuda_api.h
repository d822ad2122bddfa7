// Host entry points of the CUDA kernels. Plain C++ types only, so the bindings compile
// without CUDA headers; stream is a cudaStream_t.
#pragma once
#include <cstdint>
#include <string>

#include "../cpp/mpgemm.h"

namespace soniq::cuda {

int device_count();          // 0 when no driver/GPU (never throws)
std::string runtime_error_text();  // last device query error, for info()

// Same contract as soniq::mpgemm, with data, sums, perm, scales and out in device memory
// and the small metadata -- a.desc, b.desc and ksegs -- in HOST memory: the kernels get
// it by value, so a call never syncs or allocates and can be captured in a CUDA graph.
// Throws std::invalid_argument for bad metadata, std::runtime_error with the CUDA text.
void mpgemm(const PackedOperand& a, const PackedOperand& b, const int64_t* ksegs, int64_t nsegs,
            const Scales& scales, OutKind kind, void* out, void* stream);

// Kernel choice for mpgemm: "auto" (by shape and bits), or force "ref", "popc", "gemv"
// (a.rows per group <= 16), "mma" (INT8 tensor cores) or "bmma" (binary tensor cores)
// -- for tests and benchmarks. Process-wide.
void set_kernel(const std::string& name);
std::string get_kernel();

}  // namespace soniq::cuda
