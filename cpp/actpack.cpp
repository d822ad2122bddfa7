#include "actpack.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "code_encoding.h"
#include "dispatch.h"
#include "philox.h"
#include "threadpool.h"

namespace soniq {
namespace {

struct SegPlan : ActSegment {
  bool contiguous;  // perm[k0 + j] == perm[k0] + j: read in place instead of gathering
};

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument("quantize_pack: " + msg); }

std::vector<SegPlan> plan(const ActLayout& L, bool is_signed) {
  if (!L.perm) bad("empty layout");
  std::vector<SegPlan> out;
  for (const ActSegment& seg : act_segments(L, is_signed)) {
    // branch-free scan (it runs on every call): range, and whether the run is contiguous
    const int64_t* pk = L.perm + seg.k0;
    bool out_of_range = false, contiguous = true;
    for (int64_t j = 0; j < seg.klen; ++j) {
      out_of_range |= uint64_t(pk[j]) >= uint64_t(L.K);
      contiguous &= pk[j] == pk[0] + j;
    }
    if (out_of_range)
      for (int64_t j = 0; j < seg.klen; ++j)
        if (uint64_t(pk[j]) >= uint64_t(L.K))
          bad("perm[" + std::to_string(seg.k0 + j) + "] = " + std::to_string(pk[j]) + " is outside [0, K)");
    out.push_back(SegPlan{seg, contiguous});
  }
  return out;
}

// Noise mode: the segment's values in packed order as ops.quantize(noise="uniform") computes
// them, x * inv + alpha * (u - 1/2) with u Philox's draw for the flat index r * K + column
// (cpp/quantize.cpp's steps; this unit is built with -ffp-contract=off). Its clamp to
// [lo, hi] is left to the packer, whose clamps give the same codes.
void noisy_values(const float* xr, int64_t r, const ActLayout& L, const SegPlan& p, float inv, uint64_t seed,
                  float* v) {
  uint32_t words[4];
  uint64_t cached = ~uint64_t(0);
  const float alpha = float(p.alpha);
  for (int64_t j = 0; j < p.klen; ++j) {
    const int64_t col = L.perm[p.k0 + j];
    const uint64_t idx = uint64_t(r * L.K + col);
    if ((idx >> 2) != cached) philox::block_words(seed, cached = idx >> 2, words);
    const float u = philox::to_uniform(words[idx & 3]);
    v[j] = xr[col] * inv + alpha * (u - 0.5f);
  }
}

// One row: each segment read in packed order (in place when its columns are one contiguous
// run, else gathered through perm by the kernel), quantized and packed by the ISA kernel.
// With noise the noisy values are rounded by the same kernel at scale 1 (stochastic rounding).
void pack_row(const KernelTable& kt, const float* xr, int64_t M, int64_t r, const ActLayout& L,
              const std::vector<SegPlan>& segs, const ActNoise& noise, std::vector<float>& tmp, uint64_t* data,
              int64_t* sums, bool* nan, float* row_scale) {
  float a = 1.0f;
  if (row_scale) {  // per-token dynamic scale (actpack.h)
    int32_t m = 0;
    for (int64_t k = 0; k < L.K; ++k) {
      const int32_t v = finite_abs_bits(xr[k]);
      m = v > m ? v : m;
    }
    row_scale[r] = a = settle_row_scale(float_of_bits(m), segs.data(), int64_t(segs.size()));
  }
  for (size_t s = 0; s < segs.size(); ++s) {
    const SegPlan& p = segs[s];
    const float* src = p.contiguous ? xr + L.perm[p.k0] : xr;
    const int64_t* idx = p.contiguous ? nullptr : L.perm + p.k0;
    float inv = row_scale ? dynamic_inv(p, a) : p.inv;
    if (noise.mode) {
      tmp.resize(size_t(p.klen));
      noisy_values(xr, r, L, p, inv, noise.seed, tmp.data());
      src = tmp.data(), idx = nullptr, inv = 1.0f;
    }
    uint64_t* out = data + M * p.word_off + r * p.kw;
    sums[r * int64_t(segs.size()) + int64_t(s)] =
        kt.quant_pack(src, idx, p.klen, p.kw, inv, p.lo, p.hi, p.alpha, p.bits, out, M * p.kw, nan);
  }
}

// The first column of row xr holding a NaN, or -1.
int64_t first_nan(const float* xr, int64_t K) {
  for (int64_t k = 0; k < K; ++k)
    if (std::isnan(xr[k])) return k;
  return -1;
}

[[noreturn]] void report_nan(const float* x, int64_t M, int64_t ldx, int64_t K) {
  for (int64_t r = 0; r < M; ++r)
    if (const int64_t k = first_nan(x + r * ldx, K); k >= 0)
      throw std::invalid_argument("x[" + std::to_string(r) + ", " + std::to_string(k) +
                                  "] is NaN: activations must not be NaN to be quantized");
  throw std::invalid_argument("x holds a NaN: activations must not be NaN to be quantized");
}

}  // namespace

int64_t act_row_words(const ActLayout& L) {
  int64_t words = 0;
  for (int64_t s = 0; s < L.nsegs; ++s) words += L.segs[3 * s + 2] * L.segs[3 * s + 1];
  return words;
}

void check_row_words(const ActLayout& L, int64_t row_words) {
  if (L.nsegs <= 0 || act_row_words(L) != row_words) bad("row_words does not match the segments");
}

std::vector<ActSegment> act_segments(const ActLayout& L, bool is_signed) {
  if (L.K <= 0 || L.nsegs <= 0 || !L.segs || !L.seg_scale) bad("empty layout");
  std::vector<ActSegment> out;
  int64_t k0 = 0, words = 0;
  for (int64_t s = 0; s < L.nsegs; ++s) {
    const int64_t klen = L.segs[3 * s], kw = L.segs[3 * s + 1], bits = L.segs[3 * s + 2];
    if (klen <= 0 || klen > L.K - k0 || kw != (klen + 63) / 64) bad("segment " + std::to_string(s) + " is malformed");
    if (bits < 1 || bits > 8) bad("segment bits must be in 1..8, got " + std::to_string(bits));
    const float s_ = L.seg_scale[s], inv = 1.0f / s_;  // 1/s in float, exactly as quantize.cpp
    if (!(s_ > 0.0f) || !std::isfinite(s_) || !std::isfinite(inv))
      bad("scale " + std::to_string(s_) + " of segment " + std::to_string(s) + " must be finite, > 0 and have a finite float32 inverse");
    const CodeEncoding e = code_encoding(int(bits), is_signed);
    const ActSegment p{k0, klen, kw, words, int(bits), int(e.alpha), inv, float(e.lo), float(e.hi), s_};
    out.push_back(p);
    k0 += klen;
    words += bits * kw;
  }
  if (k0 != L.K) bad("segment lengths sum to " + std::to_string(k0) + ", not K = " + std::to_string(L.K));
  return out;
}

void quantize_pack(const float* x, int64_t M, int64_t ldx, const ActLayout& L, bool is_signed, uint64_t* data,
                   int64_t* sums, ActNoise noise, uint8_t* nan_rows, float* row_scale) {
  if (M <= 0 || !x || !data || !sums) bad("x must be non-empty");
  if (noise.mode != 0 && noise.mode != 1) bad("noise must be 0 (none) or 1 (uniform)");
  const std::vector<SegPlan> segs = plan(L, is_signed);
  const KernelTable& kt = active_kernels();
  const int64_t chunk = rows_per_task(M, L.K);  // (threadpool.h: 4K-16K values per task)
  const int64_t ntasks = (M + chunk - 1) / chunk;
  std::atomic<bool> any_nan{false};
  parallel_for(ntasks, [&](int64_t t) {
    bool nan = false;
    std::vector<float> tmp;
    const int64_t r1 = std::min(M, (t + 1) * chunk);
    for (int64_t r = t * chunk; r < r1; ++r) pack_row(kt, x + r * ldx, M, r, L, segs, noise, tmp, data, sums, &nan, row_scale);
    if (nan) any_nan.store(true, std::memory_order_relaxed);
  });
  if (nan_rows) {
    const bool any = any_nan.load();  // else no row needs the scan
    for (int64_t r = 0; r < M; ++r) nan_rows[r] = any && first_nan(x + r * ldx, L.K) >= 0;
  } else if (any_nan.load()) {
    report_nan(x, M, ldx, L.K);
  }
}

}  // namespace soniq
