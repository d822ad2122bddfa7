// The packed Linear layer's forward on the CPU in one native call (issue 13): float32 rows
// are quantized per K segment straight to the code bytes the weight-layout kernels read
// (no bit planes, no per-call expansion), then the layout GEMM runs with the bias added in
// its float epilogue. Equal, bit for bit, to quantize_pack + mpgemm + (out + bias).
// Needs a weight kept as its execution layout only (every ISA's kernels read it).
#pragma once
#include <cstdint>
#include <vector>

#include "actpack.h"
#include "mpgemm.h"

namespace soniq {

class LinearPlan {
 public:
  // act: the activations' K layout (perm [K], segs [nsegs][3] = klen, kw, bits) and its
  // quantization scales per segment; out_seg_scale: the scale the output carries per segment
  // (null = 1); dynamic: per-token scales (actpack.h). w: the weight operand (data null,
  // desc/sums/perm), ksegs [nsegs][2], w_row_scale [N] (null = 1), bias [N] (null = none).
  // inv_smooth [K] (null = none): SmoothQuant's per-input-column factors 1/s in x's column
  // order; the quantize pass reads x * inv_smooth (each product a float32 multiply of its own,
  // as torch's x * inv_smooth before it; per-token scales are those of the product), so a
  // smoothed layer costs no extra pass over x and no temporary.
  // hadamard_block (0 = none; else a power of two >= 2 dividing K): the quantize pass reads
  // each row rotated (cpp/hadamard.h) into a per-thread row buffer, as
  // python/soniq/_hadamard.py rotates it; not with inv_smooth.
  // Everything is copied except w_layout, which the caller keeps alive.
  LinearPlan(const ActLayout& act, bool a_signed, const float* out_seg_scale, bool dynamic, const PackedOperand& w,
             const int64_t* ksegs, const int8_t* w_layout, const float* w_row_scale, const float* bias,
             const float* inv_smooth = nullptr, int hadamard_block = 0);

  // out [M, N] (row-major) from x [M, K] (row r at x + r * ldx, unit column stride). A row
  // holding a NaN gives a NaN output row (as the float layer would). Runs on the active ISA's
  // kernels (every kernel table has layout kernels), whichever was active when it was made.
  // gelu: the exact GELU (cpp/gelu.h) applied to each output row as soon as it is final (the
  // fused Linear + GELU of feed-forward blocks).
  void forward(const float* x, int64_t M, int64_t ldx, float* out, bool gelu = false) const;

  int64_t in_features() const { return K_; }
  int64_t out_features() const { return N_; }
  bool smoothed() const { return !inv_smooth_.empty(); }
  int hadamard_block() const { return hadamard_block_; }

 private:
  int64_t K_, N_, nsegs_;
  bool a_signed_, dynamic_;
  int hadamard_block_;
  std::vector<int64_t> perm_, segs_, ksegs_, w_desc_, w_sums_, w_perm_;
  std::vector<float> seg_scale_, out_seg_scale_, w_row_scale_, bias_, inv_smooth_;
  std::vector<ActSegment> act_;
  std::vector<bool> contiguous_;  // segment s reads one contiguous run of x's columns
  WeightPrep w_prep_;  // the driver's per-weight work, done once (mpgemm_prepare)
  const int8_t* w_layout_;
  int64_t w_ngroups_;
  bool w_signed_;
};

}  // namespace soniq
