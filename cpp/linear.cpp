#include "linear.h"

#include <algorithm>
#include <atomic>
#include <limits>
#include <stdexcept>

#include "dispatch.h"
#include "hadamard.h"
#include "threadpool.h"
#include "wlayout.h"

namespace soniq {

namespace {
constexpr int64_t kPrefetchRows = 2;  // how far ahead the quantize pass prefetches its input rows
}  // namespace

LinearPlan::LinearPlan(const ActLayout& act, bool a_signed, const float* out_seg_scale, bool dynamic,
                       const PackedOperand& w, const int64_t* ksegs, const int8_t* w_layout,
                       const float* w_row_scale, const float* bias, const float* inv_smooth, int hadamard_block)
    : K_(act.K), N_(w.rows), nsegs_(act.nsegs), a_signed_(a_signed), dynamic_(dynamic),
      hadamard_block_(hadamard_block), w_layout_(w_layout),
      w_ngroups_(w.ngroups), w_signed_(w.is_signed) {
  if (!act.perm || !act.segs || !act.seg_scale || act.K <= 0 || act.nsegs <= 0 || !w.desc || !w.sums || !w.perm ||
      w.rows <= 0 || w.ngroups <= 0 || !ksegs || !w_layout)
    throw std::invalid_argument("LinearPlan: empty activation layout or weight");
  perm_.assign(act.perm, act.perm + K_);
  for (int64_t k : perm_)
    if (k < 0 || k >= K_) throw std::invalid_argument("LinearPlan: K permutation entry outside [0, K)");
  segs_.assign(act.segs, act.segs + 3 * nsegs_);
  seg_scale_.assign(act.seg_scale, act.seg_scale + nsegs_);
  act_ = act_segments(ActLayout{K_, perm_.data(), nsegs_, segs_.data(), seg_scale_.data()}, a_signed);
  for (const ActSegment& s : act_) {
    bool run = true;
    for (int64_t j = 0; j < s.klen; ++j) run &= perm_[size_t(s.k0 + j)] == perm_[size_t(s.k0)] + j;
    contiguous_.push_back(run);
  }
  if (out_seg_scale) out_seg_scale_.assign(out_seg_scale, out_seg_scale + nsegs_);
  ksegs_.assign(ksegs, ksegs + 2 * nsegs_);
  for (int64_t s = 0; s < nsegs_; ++s)
    if (ksegs_[size_t(2 * s)] != act_[size_t(s)].klen || ksegs_[size_t(2 * s + 1)] != act_[size_t(s)].kw)
      throw std::invalid_argument("LinearPlan: ksegs do not match the activation segments");
  w_desc_.assign(w.desc, w.desc + w.ngroups * (2 + nsegs_));
  w_sums_.assign(w.sums, w.sums + w.rows * nsegs_);
  w_perm_.assign(w.perm, w.perm + w.rows);
  if (w_row_scale) w_row_scale_.assign(w_row_scale, w_row_scale + N_);
  if (bias) bias_.assign(bias, bias + N_);
  if (inv_smooth) inv_smooth_.assign(inv_smooth, inv_smooth + K_);
  if (hadamard_block != 0 && !hadamard_block_fits(hadamard_block, K_))
    throw std::invalid_argument("LinearPlan: hadamard_block must be 0 or a power of two >= 2 dividing K");
  if (hadamard_block && inv_smooth)
    throw std::invalid_argument("LinearPlan: a rotated input cannot also be smoothed");
  const PackedOperand wop{nullptr, N_, w_ngroups_, w_desc_.data(), w_sums_.data(), w_perm_.data(), w_signed_};
  w_prep_ = mpgemm_prepare(wop, nsegs_, w_row_scale_.empty() ? nullptr : w_row_scale_.data(),
                           bias_.empty() ? nullptr : bias_.data());
}

void LinearPlan::forward(const float* x, int64_t M, int64_t ldx, float* out, bool gelu) const {
  const KernelTable& kt = active_kernels();
  if (M <= 0 || !x || !out) throw std::invalid_argument("LinearPlan.forward: x must be non-empty");
  // per calling thread, reused across calls and layers (no allocation after the first call)
  thread_local std::vector<uint8_t> bytes;
  thread_local std::vector<int64_t> sums, iota;
  thread_local std::vector<float> rscale;
  thread_local std::vector<uint8_t> nan_rows;
  thread_local std::vector<float> rotated;  // one rotated row per quantizing thread
  int64_t row_bytes = 0;
  std::vector<int64_t> byte_off;
  for (const ActSegment& s : act_) byte_off.push_back(row_bytes), row_bytes += s.kw * 64;
  if (bytes.size() < size_t(M * row_bytes)) bytes.resize(size_t(M * row_bytes));
  if (sums.size() < size_t(M * nsegs_)) sums.resize(size_t(M * nsegs_));
  if (rscale.size() < size_t(M)) rscale.resize(size_t(M));
  if (nan_rows.size() < size_t(M)) nan_rows.resize(size_t(M));
  if (int64_t(iota.size()) < M)
    for (int64_t i = int64_t(iota.size()); i < M; ++i) iota.push_back(i);
  uint8_t* B = bytes.data();
  int64_t* S = sums.data();
  float* R = rscale.data();
  uint8_t* NR = nan_rows.data();

  // 1. quantize rows: segment s of row r at B + M * byte_off[s] + r * kw * 64 (block layout)
  const int64_t chunk = rows_per_task(M, K_);
  std::atomic<bool> any_nan{false};
  const float* sm = inv_smooth_.empty() ? nullptr : inv_smooth_.data();  // indexed as a row of x
  const HadamardRowFn rotate = kt.hadamard_row ? kt.hadamard_row : hadamard_row_ref;
  parallel_for((M + chunk - 1) / chunk, [&](int64_t t) {
    float* rot = nullptr;
    if (hadamard_block_) {
      if (rotated.size() < size_t(K_)) rotated.resize(size_t(K_));
      rot = rotated.data();
    }
    for (int64_t r = t * chunk, r1 = std::min(M, (t + 1) * chunk); r < r1; ++r) {
      const float* xr = x + r * ldx;
      // the row kPrefetchRows ahead, one touch per cache line: at batch 32 the rows come from
      // memory (MiniLM 0.95-0.97x the forward's time, same-process A/B on AMX; batch 1 unchanged)
      if (r + kPrefetchRows < r1)
        for (int64_t k = 0; k < K_; k += 16) __builtin_prefetch(x + (r + kPrefetchRows) * ldx + k, 0, 3);
      if (rot) {
        rotate(xr, K_, hadamard_block_, rot);
        xr = rot;
      }
      float a = 1.0f;
      if (dynamic_) {  // the scale of the row quantized: x * inv_smooth, or the rotated row
        int32_t m = 0;
        if (kt.row_absmax) m = kt.row_absmax(xr, sm, K_);
        else if (sm)
          for (int64_t k = 0; k < K_; ++k) m = std::max(m, finite_abs_bits(xr[k] * sm[k]));
        else
          for (int64_t k = 0; k < K_; ++k) m = std::max(m, finite_abs_bits(xr[k]));
        R[r] = a = settle_row_scale(float_of_bits(m), act_.data(), nsegs_);
      }
      bool nan = false;
      for (int64_t s = 0; s < nsegs_; ++s) {
        const ActSegment& p = act_[size_t(s)];
        const bool run = contiguous_[size_t(s)];
        const int64_t off = run ? perm_[size_t(p.k0)] : 0;
        const int64_t* idx = run ? nullptr : perm_.data() + p.k0;
        const float inv = dynamic_ ? dynamic_inv(p, a) : p.inv;
        S[r * nsegs_ + s] = kt.quant_bytes(xr + off, sm ? sm + off : nullptr, idx, p.klen, p.kw, inv, p.lo, p.hi,
                                           p.alpha, B + M * byte_off[size_t(s)] + r * p.kw * 64, &nan);
      }
      NR[r] = nan;
      if (nan) any_nan.store(true, std::memory_order_relaxed);
    }
  });

  // 2. the layout GEMM with the float epilogue (+ bias)
  std::vector<int64_t> a_desc{0, M};
  std::vector<const uint8_t*> a_bytes;
  for (int64_t s = 0; s < nsegs_; ++s) {
    a_desc.push_back(act_[size_t(s)].bits);
    a_bytes.push_back(B + M * byte_off[size_t(s)]);
  }
  const PackedOperand a{nullptr, M, 1, a_desc.data(), S, iota.data(), a_signed_};
  const PackedOperand w{nullptr, N_, w_ngroups_, w_desc_.data(), w_sums_.data(), w_perm_.data(), w_signed_};
  const Scales sc{dynamic_ ? R : nullptr, w_row_scale_.empty() ? nullptr : w_row_scale_.data(),
                  out_seg_scale_.empty() ? nullptr : out_seg_scale_.data(), nullptr};
  MpgemmExtras ex;
  ex.a_bytes = a_bytes.data();
  ex.bias = bias_.empty() ? nullptr : bias_.data();
  ex.b_prep = &w_prep_;
  ex.gelu = gelu;
  mpgemm(a, w, ksegs_.data(), nsegs_, sc, OutKind::Float32, out, w_layout_, ex);

  if (any_nan.load())  // the float layer's NaN would spread over the row
    for (int64_t r = 0; r < M; ++r)
      if (NR[r]) std::fill(out + r * N_, out + (r + 1) * N_, std::numeric_limits<float>::quiet_NaN());
}

}  // namespace soniq
