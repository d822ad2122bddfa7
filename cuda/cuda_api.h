// Host entry points of the CUDA kernels. Plain C++ types only, so the bindings compile
// without CUDA headers; pointers are device pointers, stream is a cudaStream_t.
#pragma once
#include <cstdint>
#include <string>

#include "../cpp/mpgemm.h"

namespace soniq::cuda {

int device_count();          // 0 when no driver/GPU (never throws)
std::string runtime_error_text();  // last device query error, for info()

// Same contract as soniq::mpgemm, with every pointer (and ksegs) in device memory.
// Throws std::runtime_error carrying the CUDA error text.
void mpgemm(const PackedOperand& a, const PackedOperand& b, const int64_t* ksegs, int64_t nsegs,
            const Scales& scales, OutKind kind, void* out, void* stream);

}  // namespace soniq::cuda
