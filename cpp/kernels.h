// Per-ISA kernel table. Each ISA lives in its own translation unit compiled with
// its own flags (kernels_scalar.cpp, kernels_avx2.cpp, kernels_avx512.cpp); the
// dispatcher picks one at run time from cpuid + XCR0.
#pragma once
#include <cstdint>

#include "gelu.h"
#include "hadamard.h"
#include "peak_probe.h"
#include "trellis.h"

namespace soniq {

// Bit-serial block product over bit planes (layout: plane-major [bits][rows][kw]).
//   C[i*ldc + j] += (sum_p sum_q 2^(p+q) * sum_w popcount(A[p][i][w] & B[q][j][w])) << shift
// Adds into C (the driver's totals, started at its code-sum terms: no pass of its own).
// A plane stride is rows*kw words; a row stride is kw words.
using BitserialFn = void (*)(const uint64_t* A, int pa, int64_t a_plane_stride, int64_t M,
                             const uint64_t* B, int pb, int64_t b_plane_stride, int64_t N,
                             int64_t kw, int64_t* C, int64_t ldc, int shift);

// Pack unsigned codes (uint8, row-major with row stride ld) into bit planes.
// out has bits * rows * kw words; bits of columns >= klen are zero.
using PackPlanesFn = void (*)(const uint8_t* codes, int64_t rows, int64_t klen, int64_t ld,
                              int bits, int64_t kw, uint64_t* out);

// Expand bit planes back to one byte per code: out[r*ldo + k] for k < kw*64.
using UnpackPlanesFn = void (*)(const uint64_t* planes, int bits, int64_t plane_stride, int64_t rows,
                                int64_t kw, uint8_t* out, int64_t ldo);

// Quantize one row of one K segment straight to bit planes (fused activation path,
// cpp/actpack.h). The segment's floats in packed order are xs[j] = x[idx[j]] (gathered), or
// x[j] when idx is null, for j < klen; positions klen..kw*64 get code 0.
// Exactly soniq::quantize's exact mode: t = xs * inv; alpha 1: v = clamp(rne(clamp(t, lo-1,
// hi+1)), lo, hi), code = v - lo; alpha 2 (signed 1-bit): code = clamp(rne(clamp((t+1)/2,
// -2, 3)), 0, 1). Writes plane p's words at out[p * plane_stride + w]; returns the code sum
// and sets *nan when any xs is NaN (its code is unspecified; the caller raises).
using QuantPackFn = int64_t (*)(const float* x, const int64_t* idx, int64_t klen, int64_t kw, float inv, float lo,
                                float hi, int alpha, int bits, uint64_t* out, int64_t plane_stride, bool* nan);

// Quantize one row of one K segment to one unsigned code byte per position, the A operand
// the layout kernels read (the packed layers' fused path: no bit planes in between). Same
// inputs and rounding as QuantPackFn; out[j] = code of xs[j] for j < klen, 0 for
// klen <= j < kw*64. mul (or null): per-column factors indexed as x (SmoothQuant's inverse
// smoothing): xs[j] = x[idx[j]] * mul[idx[j]] (or x[j] * mul[j]), one float32 multiply
// rounded on its own before the quantization's (as torch's x * mul, then the quantizer).
// Returns the code sum; sets *nan when any xs is NaN (its code is then unspecified; the
// caller makes the row's output NaN).
using QuantBytesFn = int64_t (*)(const float* x, const float* mul, const int64_t* idx, int64_t klen, int64_t kw,
                                 float inv, float lo, float hi, int alpha, uint8_t* out, bool* nan);

// The largest finite_abs_bits (cpp/actpack.h) over x[0..n) (times mul[0..n), each product
// rounded to float32, when mul is set): a row's largest finite |x| as its bit pattern
// (per-token dynamic scales).
using RowAbsMaxFn = int32_t (*)(const float* x, const float* mul, int64_t n);

// Float output of one tile row with one K segment, in exactly the scalar driver's order:
//   out_row[perm[j]] = float(((0.0 + double(acc[j]) * segscale) [* ar]) [* double(b_row[perm[j]])])
//                      [+ bias[perm[j]]]  (a float32 add, as torch's out + bias)
// for j < n ("[* ar]" when has_ar, "[* b_row]" / "[+ bias]" when b_row / bias are set).
using EpilogueF32Fn = void (*)(const int64_t* acc, int64_t n, double segscale, bool has_ar, double ar,
                               const float* b_row, const int64_t* perm, float* out_row, const float* bias);

// Float epilogue a layout GEMM kernel applies at its store when its block is all of the
// product (one K segment, float32 output), instead of writing int64 totals for the driver's
// epilogue pass; the same values, bit for bit, as that pass (EpilogueF32Fn): for A row i < M
// and column j < N of the call,
//   out[arow[i] * ldo + ocol[j]] = float(((0.0 + double(rowterm[i] + colterm[j] + (product << shift))
//       * segscale) [* a_row[arow[i]]]) [* double(b_row[j])]) [+ bias[j]]
// (b_row and bias in the call's column order; a float32 add for the bias). run[j / 8]: the
// live columns of group j..j+7 land consecutively (ocol[j + q] = ocol[j] + q): one store.
struct LayoutEpilogue {
  float* out;
  int64_t ldo;
  const int64_t* arow;  // [M]
  const int64_t* ocol;  // [N]
  const uint8_t* run;   // [ceil(N / 8)]
  double segscale;
  const float* a_row;   // by output row, or null
  const float* b_row;   // [N], or null
  const float* bias;    // [N], or null
};
// K (codes) up to which the layout GEMM kernels accept an epilogue (int32 lanes stay exact).
constexpr int64_t kLayoutEpilogueMaxK = 32768;

// A weight's output columns back in their original order. The packed weight sorts its
// output channels by tier, so where tiers interleave the kernel's float epilogue would store
// each output alone (and at large M each output line would be read from DRAM once per
// tier). The driver instead has the kernel write rows in packed column order and merges
// them: out[r * ldo + c] = src[r * lds + inv[c]] for c < n, r < rows. Where each group's
// columns ascend in the original order (the packer's stable tier sort), masks[q * ngroups + g]
// marks which of the original columns 16q..16q+15 come from group g, whose columns start at
// src[start[g]]: a row is a merge of ascending streams (16 outputs from one expand per
// group). src rows hold 16 readable floats past their n.
struct ColumnMerge {
  int64_t n = 0, ngroups = 0;
  const int32_t* inv = nullptr;     // [n]: packed column of original column c
  const uint16_t* masks = nullptr;  // [ceil(n / 16)][ngroups], or null (some group not ascending)
  const int64_t* start = nullptr;   // [ngroups]: packed column of each group's first
  // two groups, ascending: per original column c its lane in the 32 floats of group 0's next
  // 16 then group 1's next 16 (the window of its 16-column chunk); [ceil(n / 16) * 16]
  const uint8_t* lanes2 = nullptr;
};
using MergeColumnsFn = void (*)(const float* src, int64_t lds, int64_t rows, const ColumnMerge& cm, float* out,
                                int64_t ldo);

// Byte x execution-layout product (cpp/wlayout.h) for one block, added into C: for j < N,
//   C[i*ldc + j] = base(i, j) + ((sum_{k < kw*64} A[i*lda + k] * s(j, k)) << shift)
// with base = rowterm[i] + colterm[j] when rowterm is set (C is then only written: the
// driver's code-sum corrections, fused to spare a pass over C), else C[i*ldc + j]; s is the
// stored code (u, or u - 128 for 8-bit blocks: the driver adds 128 * the A row's code sum).
// L points at the tile holding column 0; ceil(N/16) tiles follow. ep (layout_gemm only, with
// rowterm set and kw * 64 <= kLayoutEpilogueMaxK): the float outputs are written through it
// and C is not touched.
using LayoutGemmFn = void (*)(const uint8_t* A, int64_t lda, int64_t M, const int8_t* L, int bits, int64_t N,
                              int64_t kw, int64_t* C, int64_t ldc, int shift, const int64_t* rowterm,
                              const int64_t* colterm, const LayoutEpilogue* ep);

// Each ISA's table is filled field by field (by name, in its own translation unit); a field
// it leaves unset keeps the default below: null for an optional kernel.
struct KernelTable {
  const char* name = nullptr;
  BitserialFn bitserial = nullptr;
  PackPlanesFn pack_planes = nullptr;
  UnpackPlanesFn unpack_planes = nullptr;
  // The driver uses bit-serial for a block pair when bits_a * bits_b <= this, else the
  // byte path (measured per ISA: bench/cpp/bench_mpgemm.cpp).
  int bitserial_max_pairs = 0;
  int bitserial_max_pairs_gemv = 0;  // the same for tiles of 1-2 A rows (B decode not amortized)
  // A packed layer keeps its weight's bit planes (the bit-serial kernel's operand) when its
  // smallest bits_a * bits_b is at most this; else its execution layout alone, which runs the
  // fused native forward (cpp/linear.h) at every M. Measured through PackedLinear, where the
  // planes' path pays quantize_pack + mpgemm (2-4x at GEMV and M = 16: docs/DESIGN_NOTES.md),
  // so it can be below the kernel thresholds above. Every table sets it.
  int keep_planes_max_pairs = 0;
  QuantPackFn quant_pack = nullptr;  // every table sets it
  EpilogueF32Fn epilogue_f32 = nullptr;  // optional: the driver's scalar loop otherwise
  // Every table sets these: the kernels over the weight execution layout, which run every
  // block pair that is not bit-serial: layout_gemv for tiles of at most layout_gemv_rows A
  // rows (weights streamed once, decoded in registers), else layout_gemm (per 64 columns all
  // of K decoded once into a buffer, reused by all rows).
  LayoutGemmFn layout_gemv = nullptr;
  LayoutGemmFn layout_gemm = nullptr;
  int layout_gemv_rows = 0;
  // Every table sets it: the packed layers' fused forward (cpp/linear.h) quantizes
  // activations straight to the bytes the layout kernels read.
  QuantBytesFn quant_bytes = nullptr;
  RowAbsMaxFn row_absmax = nullptr;  // optional: a plain loop otherwise
  HadamardRowFn hadamard_row = nullptr;  // optional: hadamard_row_ref otherwise
  GeluRowFn gelu_row = nullptr;  // optional: gelu_row_ref otherwise
  TrellisStepFn trellis_step = nullptr;  // optional: trellis_step_ref otherwise
  MergeColumnsFn merge_columns = nullptr;  // every table sets it
  // optional: measured throughput of this path's inner-loop instructions (cpp/peak_probe.h),
  // what the benchmarks hold the kernels to
  PeakProbeFn peak_probe = nullptr;
};

// Defined in each ISA's translation unit (only those built for this target).
const KernelTable& kernels_scalar();
#if defined(SONIQ_HAVE_X86_ISAS)
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();
#endif

}  // namespace soniq
