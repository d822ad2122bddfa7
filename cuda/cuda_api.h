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
// (a.rows per group <= 16), "mma" (INT8 tensor cores), "mma4" (INT4 tensor cores when
// every block has <= 4 bits, else as "mma": what "auto" picks instead of "mma" on sm_80-89;
// it runs, slower, on sm_90), "bmma" (binary tensor cores) or "int8mm" (codes expanded to
// int8 in global memory + cuBLAS INT8, driven from Python: python/soniq/ops/_int8mm.py)
// -- for tests and benchmarks. Process-wide.
void set_kernel(const std::string& name);
std::string get_kernel();
// The kernel mpgemm would run for these operands (host metadata only; validates it).
// mpgemm itself runs "mma" where this says "int8mm".
std::string choose_kernel(const PackedOperand& a, const PackedOperand& b, const int64_t* ksegs, int64_t nsegs);

// One packed block [bits][rows][kw] -> int8 [rows_pad][kpad] row-major, c = u - 128 for
// k < klen and rows < rows, 0 in the padding (kpad % 8 == 0; out 8-byte aligned).
void expand_codes(const uint64_t* planes, int bits, int64_t rows, int64_t kw, int64_t klen, void* out,
                  int64_t rows_pad, int64_t kpad, void* stream);

}  // namespace soniq::cuda
