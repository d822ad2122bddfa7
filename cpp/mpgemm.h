// Mixed-precision GEMM over packed operands: out = a_int @ b_int.T (optionally scaled).
// A packed operand is a grid of uniform-precision blocks: row groups (tiers along
// rows) x K segments (tiers along K). Both operands share the K segmentation.
#pragma once
#include <cstdint>
#include <vector>

#include "code_encoding.h"  // value = alpha * code + offset of each block
#include "kernels.h"        // ColumnMerge

namespace soniq {

struct PackedOperand {
  const uint64_t* data = nullptr;  // blocks in (group, segment) order, each [bits][rows][kw]
  int64_t rows = 0;                // packed rows
  int64_t ngroups = 0;
  const int64_t* desc = nullptr;   // [ngroups][2 + nsegs]: row_start, row_count, bits per segment
  const int64_t* sums = nullptr;   // [rows][nsegs]: sum of unsigned codes per row and segment
  const int64_t* perm = nullptr;   // [rows]: packed row -> original row
  bool is_signed = false;
};

enum class OutKind { Int32 = 0, Int64 = 1, Float32 = 2 };

struct Scales {  // any may be null (= 1)
  const float* a_row = nullptr;  // [a rows], original order
  const float* b_row = nullptr;  // [b rows], original order
  const float* a_seg = nullptr;  // [nsegs]
  const float* b_seg = nullptr;  // [nsegs]
};

// What mpgemm derives from the weight alone for a float32 output (the epilogue's row scales and
// bias in packed column order, and per 8 columns of each row group whether they land
// consecutively in the output), after checking the weight: O(N) per call (about a third of
// a K = 64, N = 14336 call on one thread), so a caller that runs one weight many times
// (LinearPlan) makes it once with mpgemm_prepare and passes it in MpgemmExtras.
struct WeightPrep {
  std::vector<float> b_row, bias;           // [b rows] in packed order; empty when absent
  std::vector<std::vector<uint8_t>> runs;   // per row group, per 8 columns
  // Where some run is broken (tiers interleave in the output): the column merge (kernels.h
  // ColumnMerge), ~5 bytes per column (two tiers).
  bool scattered = false;
  std::vector<int32_t> merge_inv;
  std::vector<int64_t> merge_start;
  std::vector<uint16_t> merge_masks;
  std::vector<uint8_t> merge_lanes2;
  ColumnMerge column_merge() const {
    return ColumnMerge{int64_t(merge_inv.size()), int64_t(merge_start.size()), merge_inv.data(),
                       merge_masks.empty() ? nullptr : merge_masks.data(), merge_start.data(),
                       merge_lanes2.empty() ? nullptr : merge_lanes2.data()};
  }
};
WeightPrep mpgemm_prepare(const PackedOperand& b, int64_t nsegs, const float* b_row, const float* bias);

// What the packed layers' fused forward (cpp/linear.h) hands the driver besides the operands.
struct MpgemmExtras {
  // A as one unsigned code byte per K position, block (g, s) at a_bytes[g * nsegs + s]
  // (rows x kw*64, zero padded), instead of a.data's bit planes; needs b without planes
  // (every block pair on the layout kernels).
  const uint8_t* const* a_bytes = nullptr;
  const float* bias = nullptr;  // [b rows], original order: added to the float32 output
  // mpgemm_prepare(b, nsegs, scales.b_row, bias) of this b, made beforehand (b then is not
  // checked again: the caller made it from the same operand and keeps it unchanged)
  const WeightPrep* b_prep = nullptr;
  // float32 output only: the exact GELU (cpp/gelu.h) applied in place to each output row once
  // it is final, by the thread that wrote it (merged rows right after their merge)
  bool gelu = false;
};

// ksegs: [nsegs][2] = (klen, kw). out: [a.rows][b.rows] row-major, original order.
// b_layout: b's execution layout (cpp/wlayout.h), built once by the caller and kept with
// the weight; used where the active ISA has layout kernels (built per call when null).
// b.data may be null when b_layout is given (a weight kept as its layout only): every block
// pair then runs on the layout kernels (an ISA without them throws std::invalid_argument).
void mpgemm(const PackedOperand& a, const PackedOperand& b, const int64_t* ksegs, int64_t nsegs,
            const Scales& scales, OutKind kind, void* out, const int8_t* b_layout = nullptr,
            const MpgemmExtras& extras = {});

// Which block kernel the driver uses: Auto picks per block pair (select_block_kernel in
// mpgemm.cpp, the one place that chooses); the others force one (tests, benchmarks): Bytes
// is the byte-code kernels over the weight execution layout, which every ISA has.
enum class KernelPath { Auto = 0, Bitserial = 1, Bytes = 2 };
void set_kernel_path(KernelPath p);
KernelPath get_kernel_path();

}  // namespace soniq
