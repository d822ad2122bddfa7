// The CUDA kernels of cuda/ run on the CPU emulator (tests/cuda_emu) against exact
// references: every mpgemm kernel (ref, popc, gemv, mma, bmma, auto) for every bit pair
// 1..8 x 1..8, signed and unsigned, per-channel two-tier operands along rows and K, odd
// shapes (M = 1, N = 1, K not a multiple of 64, several tiles and pipeline stages), an
// 8-byte-aligned operand (the 8-byte cp.async path), int32/int64/float32 outputs with
// scales (float bitwise equal to the CPU's soniq::mpgemm), long K past the s32 flush
// points; expand_codes and the quantizer; and self-tests showing the emulator catches a
// missing barrier, a diverged warp collective and a wrong mma fragment.
//
// Usage: soniq_cuda_emu_test [--quick] [--seed N]   (exit 0 = all passed)
// Env: SONIQ_EMU_ORDER=forward|reverse, SONIQ_EMU_CP_ASYNC=late|eager (see emu.cpp).
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpp/actpack.h"
#include "cpp/mpgemm.h"
#include "cpp/pack.h"
#include "cpp/quantize.h"
#include "cuda/cuda_api.h"
#include "cuda/ptx.cuh"
#include "cuda/quantize_api.h"

namespace {

int g_failures = 0, g_checks = 0;

// Prints how long each part took and how many checks it added.
struct Section {
  const char* name;
  int checks0 = g_checks, failures0 = g_failures;
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  explicit Section(const char* n) : name(n) {}
  ~Section() {
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("  %-34s %5d checks %3d failures %7.1f s\n", name, g_checks - checks0, g_failures - failures0, s);
    std::fflush(stdout);
  }
};
std::mt19937_64 g_rng(20261202);

void expect(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    if (g_failures <= 40) std::printf("FAIL: %s\n", what.c_str());
  }
}

int64_t rnd(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(g_rng); }

// ---- packed operands built independently of the Python packer ---------------------------
struct Layout {
  std::vector<int64_t> group_rows;               // rows per group (tiers along rows)
  std::vector<std::vector<int>> bits;            // [group][segment]
};

struct Operand {
  int64_t rows = 0;
  bool is_signed = false;
  std::vector<int64_t> values;  // [rows][K], original row order
  std::vector<uint64_t> data;   // one spare word in front, for the 8-byte-aligned case
  size_t lead = 0;              // words skipped before the blocks (0 or 1)
  std::vector<int64_t> desc, sums, perm;
  int64_t ngroups = 0;

  soniq::PackedOperand view() const {
    soniq::PackedOperand p;
    p.data = data.data() + lead;
    p.rows = rows;
    p.ngroups = ngroups;
    p.desc = desc.data();
    p.sums = sums.data();
    p.perm = perm.data();
    p.is_signed = is_signed;
    return p;
  }
};

Operand make_operand(const Layout& L, const std::vector<int64_t>& klens, const std::vector<int64_t>& kws,
                     bool is_signed, bool misalign, bool extreme = false) {
  Operand op;
  op.is_signed = is_signed;
  op.ngroups = int64_t(L.group_rows.size());
  op.rows = std::accumulate(L.group_rows.begin(), L.group_rows.end(), int64_t(0));
  const int64_t S = int64_t(klens.size());
  const int64_t K = std::accumulate(klens.begin(), klens.end(), int64_t(0));
  op.perm.resize(size_t(op.rows));
  std::iota(op.perm.begin(), op.perm.end(), 0);
  std::shuffle(op.perm.begin(), op.perm.end(), g_rng);
  op.values.assign(size_t(op.rows * K), 0);
  op.sums.assign(size_t(op.rows * S), 0);
  op.lead = misalign ? 1 : 0;
  op.data.assign(op.lead, 0);
  int64_t r0 = 0;
  for (int64_t g = 0; g < op.ngroups; ++g) {
    const int64_t R = L.group_rows[size_t(g)];
    op.desc.push_back(r0);
    op.desc.push_back(R);
    for (int64_t s = 0; s < S; ++s) op.desc.push_back(L.bits[size_t(g)][size_t(s)]);
    int64_t k0 = 0;
    for (int64_t s = 0; s < S; ++s) {
      const int b = L.bits[size_t(g)][size_t(s)];
      const soniq::CodeEncoding enc = soniq::code_encoding(b, is_signed);
      const int64_t alpha = enc.alpha, offset = enc.offset;
      const int64_t klen = klens[size_t(s)], kw = kws[size_t(s)];
      std::vector<uint8_t> codes(size_t(R * klen));
      for (int64_t r = 0; r < R; ++r) {
        const int64_t packed = r0 + r, orig = op.perm[size_t(packed)];
        for (int64_t k = 0; k < klen; ++k) {
          const int64_t u = extreme ? (int64_t(1) << b) - 1 : rnd(0, (int64_t(1) << b) - 1);
          codes[size_t(r * klen + k)] = uint8_t(u);
          op.values[size_t(orig * K + k0 + k)] = alpha * u + offset;
          op.sums[size_t(packed * S + s)] += u;
        }
      }
      const size_t at = op.data.size();
      op.data.resize(at + size_t(b * R * kw));
      soniq::pack_block(codes.data(), R, klen, klen, b, kw, op.data.data() + at);
      k0 += klen;
    }
    r0 += R;
  }
  return op;
}

std::vector<int64_t> exact_product(const Operand& a, const Operand& b, int64_t K) {
  std::vector<int64_t> out(size_t(a.rows * b.rows), 0);
  for (int64_t m = 0; m < a.rows; ++m)
    for (int64_t n = 0; n < b.rows; ++n) {
      int64_t acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += a.values[size_t(m * K + k)] * b.values[size_t(n * K + k)];
      out[size_t(m * b.rows + n)] = acc;
    }
  return out;
}

// ---- one mpgemm case on every kernel ----------------------------------------------------
struct Case {
  std::string name;
  Layout la, lb;
  std::vector<int64_t> klens;
  bool a_signed = false, b_signed = true, pad_kw = false, misalign = false, extreme = false;
  std::vector<std::string> kernels = {"ref", "popc", "gemv", "mma", "mma4", "bmma", "auto"};
  bool float_out = true;
};

int max_group_rows(const Layout& L) {
  int64_t m = 0;
  for (int64_t r : L.group_rows) m = std::max(m, r);
  return int(m);
}

// mma4 runs on u4 when every block of both operands has <= 4 bits
bool all_int4(const Case& c) {
  for (const Layout* L : {&c.la, &c.lb})
    for (const auto& g : L->bits)
      for (int b : g)
        if (b > 4) return false;
  return true;
}

void run_case(const Case& c) {
  std::vector<int64_t> kws, ksegs;
  for (int64_t klen : c.klens) {
    int64_t kw = (klen + 63) / 64;
    if (c.pad_kw && kw % 2) ++kw;  // padded words must be read as zeros
    kws.push_back(kw);
    ksegs.push_back(klen);
    ksegs.push_back(kw);
  }
  const int64_t S = int64_t(c.klens.size());
  const int64_t K = std::accumulate(c.klens.begin(), c.klens.end(), int64_t(0));
  const Operand a = make_operand(c.la, c.klens, kws, c.a_signed, c.misalign, c.extreme);
  const Operand b = make_operand(c.lb, c.klens, kws, c.b_signed, false, c.extreme);
  const std::vector<int64_t> exact = exact_product(a, b, K);
  const size_t n_out = exact.size();

  // float outputs with row and segment scales: the CPU result is the reference (bitwise)
  std::vector<float> a_row(static_cast<size_t>(a.rows)), b_row(static_cast<size_t>(b.rows)), a_seg(static_cast<size_t>(S)),
      b_seg(static_cast<size_t>(S));
  std::uniform_real_distribution<float> sc(0.01f, 2.0f);
  for (auto& v : a_row) v = sc(g_rng);
  for (auto& v : b_row) v = sc(g_rng);
  for (auto& v : a_seg) v = sc(g_rng);
  for (auto& v : b_seg) v = sc(g_rng);
  const soniq::Scales scales{a_row.data(), b_row.data(), a_seg.data(), b_seg.data()};
  std::vector<float> want_f(n_out);
  std::vector<int64_t> cpu_i64(n_out);
  soniq::mpgemm(a.view(), b.view(), ksegs.data(), S, soniq::Scales{}, soniq::OutKind::Int64, cpu_i64.data());
  expect(cpu_i64 == exact, c.name + ": CPU mpgemm != exact product (test harness)");
  if (c.float_out)
    soniq::mpgemm(a.view(), b.view(), ksegs.data(), S, scales, soniq::OutKind::Float32, want_f.data());

  for (const std::string& k : c.kernels) {
    if (k == "gemv" && max_group_rows(c.la) > 16) continue;
    soniq::cuda::set_kernel(k);
    const std::string tag = c.name + " [" + k + "]";
    try {
      std::vector<int64_t> got64(n_out, -7);
      const unsigned long long u4_before = soniq_emu::mma_u4_count();
      soniq::cuda::mpgemm(a.view(), b.view(), ksegs.data(), S, soniq::Scales{}, soniq::OutKind::Int64, got64.data(),
                          nullptr);
      // mma4 runs on the u4 instruction exactly when every block has <= 4 bits
      const bool used_u4 = soniq_emu::mma_u4_count() != u4_before;
      const std::string ran = k == "auto" ? soniq::cuda::choose_kernel(a.view(), b.view(), ksegs.data(), S) : k;
      if (ran == "mma4") expect(used_u4 == all_int4(c), tag + ": u4 mma used iff every block has <= 4 bits");
      else expect(!used_u4, tag + ": no u4 mma outside mma4");
      size_t bad = 0;
      for (size_t i = 0; i < n_out; ++i) bad += got64[i] != exact[i];
      expect(bad == 0, tag + " int64: " + std::to_string(bad) + " of " + std::to_string(n_out) + " outputs differ");

      std::vector<int32_t> got32(n_out, -7);
      soniq::cuda::mpgemm(a.view(), b.view(), ksegs.data(), S, soniq::Scales{}, soniq::OutKind::Int32, got32.data(),
                          nullptr);
      bad = 0;
      for (size_t i = 0; i < n_out; ++i) bad += got32[i] != int32_t(exact[i]);
      expect(bad == 0, tag + " int32: " + std::to_string(bad) + " outputs differ");

      if (c.float_out) {
        std::vector<float> gotf(n_out, -7.0f);
        soniq::cuda::mpgemm(a.view(), b.view(), ksegs.data(), S, scales, soniq::OutKind::Float32, gotf.data(),
                            nullptr);
        expect(std::memcmp(gotf.data(), want_f.data(), n_out * sizeof(float)) == 0,
               tag + " float32 with scales: not bitwise the CPU's");
      }
    } catch (const std::exception& e) {
      expect(false, tag + ": threw " + e.what());
    }
  }
  soniq::cuda::set_kernel("auto");
}

Layout uniform(int64_t rows, std::vector<int> seg_bits) { return Layout{{rows}, {seg_bits}}; }

// ---- kernel choice: INT4 tensor cores on sm_80-89 only ----------------------------------
void test_kernel_choice() {
  const std::vector<int64_t> klens = {200}, kws = {4}, ksegs = {200, 4};
  const Operand a = make_operand(uniform(16, {4}), klens, kws, false, false);
  const Operand b = make_operand(uniform(40, {4}), klens, kws, true, false);
  const Operand b8 = make_operand(uniform(40, {8}), klens, kws, true, false);
  soniq::cuda::set_kernel("auto");
  const char* cc = std::getenv("SONIQ_EMU_CC");
  const std::string saved = cc ? cc : "";
  for (const char* dev : {"80", "86", "89", "90"}) {
    setenv("SONIQ_EMU_CC", dev, 1);
    const bool ampere = dev[0] == '8';
    // M=16 W4A4: 16 x 4 x 4 > 64, past the GEMV rule: tensor cores, u4 where the chip has them
    expect(soniq::cuda::choose_kernel(a.view(), b.view(), ksegs.data(), 1) == (ampere ? "mma4" : "mma"),
           std::string("auto picks ") + (ampere ? "mma4" : "mma") + " for M=16 W4A4 on sm_" + dev);
    // 8-bit blocks: the plain INT8 kernel
    expect(soniq::cuda::choose_kernel(a.view(), b8.view(), ksegs.data(), 1) == "mma",
           std::string("auto picks mma for M=16 W8A4 on sm_") + dev);
  }
  if (cc) setenv("SONIQ_EMU_CC", saved.c_str(), 1);
  else unsetenv("SONIQ_EMU_CC");
}

// ---- expand_codes and the quantizer ------------------------------------------------------
void test_expand_codes() {
  for (int bits = 1; bits <= 8; ++bits)
    for (int64_t rows : {1, 7, 33})
      for (int64_t klen : {1, 63, 64, 130}) {
        const int64_t kw = (klen + 63) / 64 + (bits % 2);  // sometimes a padded word
        std::vector<uint8_t> codes(size_t(rows * klen));
        for (auto& u : codes) u = uint8_t(rnd(0, (1 << bits) - 1));
        std::vector<uint64_t> planes(size_t(bits * rows * kw));
        soniq::pack_block(codes.data(), rows, klen, klen, bits, kw, planes.data());
        const int64_t rows_pad = rows + 3, kpad = (klen + 7) / 8 * 8 + 8;
        std::vector<uint64_t> out(size_t(rows_pad * kpad / 8), 0x5555555555555555ull);
        const std::string tag = "expand_codes bits=" + std::to_string(bits) + " rows=" + std::to_string(rows) +
                                " klen=" + std::to_string(klen);
        try {
          soniq::cuda::expand_codes(planes.data(), bits, rows, kw, klen, out.data(), rows_pad, kpad, nullptr);
          const auto* bytes = reinterpret_cast<const int8_t*>(out.data());
          size_t bad = 0;
          for (int64_t r = 0; r < rows_pad; ++r)
            for (int64_t k = 0; k < kpad; ++k) {
              const int want = (r < rows && k < klen) ? int(codes[size_t(r * klen + k)]) - 128 : 0;
              bad += bytes[r * kpad + k] != want;
            }
          expect(bad == 0, tag + ": " + std::to_string(bad) + " bytes differ");
        } catch (const std::exception& e) {
          expect(false, tag + ": threw " + e.what());
        }
      }
}

template <class T>
void test_quantize_t(const char* dtype) {
  const int64_t outer = 3, C = 5, inner = 37;
  const int64_t n = outer * C * inner;
  const size_t nc = static_cast<size_t>(C);
  std::vector<T> x(static_cast<size_t>(n)), scale(nc), lo(nc), hi(nc), alpha(nc);
  std::normal_distribution<double> nd(0.0, 2.0);
  for (auto& v : x) v = T(nd(g_rng));
  for (int64_t c = 0; c < C; ++c) {
    const int bits = int(1 + c);
    scale[size_t(c)] = T(0.05 + 0.1 * double(c));
    const soniq::CodeEncoding e = soniq::code_encoding(bits, true);
    alpha[size_t(c)] = T(e.alpha);
    lo[size_t(c)] = T(e.lo);
    hi[size_t(c)] = T(e.hi);
  }
  const soniq::QuantParams<T> qp{scale.data(), lo.data(), hi.data(), alpha.data()};
  for (int noise = 0; noise <= 1; ++noise)
    for (bool values_only : {false, true}) {
      std::vector<T> want(static_cast<size_t>(n)), got(static_cast<size_t>(n), T(-99));
      soniq::quantize<T>(x.data(), soniq::QuantShape{outer, C, inner}, qp, noise, 1234, values_only, want.data());
      const std::string tag = std::string("quantize ") + dtype + " noise=" + std::to_string(noise) +
                              " values_only=" + std::to_string(values_only);
      try {
        soniq::cuda::quantize(int(sizeof(T)), x.data(), outer, C, inner, scale.data(), lo.data(), hi.data(),
                              alpha.data(), noise, 1234, values_only, got.data(), nullptr);
        expect(std::memcmp(got.data(), want.data(), sizeof(T) * size_t(n)) == 0, tag + ": not bitwise the CPU's");
      } catch (const std::exception& e) {
        expect(false, tag + ": threw " + e.what());
      }
    }
  std::vector<T> want(1000), got(1000);
  soniq::philox_uniform<T>(1000, 99, want.data());
  soniq::cuda::philox_uniform(int(sizeof(T)), 1000, 99, got.data(), nullptr);
  expect(std::memcmp(got.data(), want.data(), sizeof(T) * 1000) == 0, std::string("philox_uniform ") + dtype);
}

// ---- fused activation quantize + pack: word for word the CPU's -------------------------
void test_quantize_pack() {
  struct QP {
    int64_t M, ldx_pad;
    std::vector<int64_t> klens;
    std::vector<int> bits;
    bool is_signed;
  };
  const std::vector<QP> cases = {
      {1, 0, {1}, {4}, true},
      {1, 0, {700}, {8}, false},
      {5, 3, {64, 65, 1}, {2, 8, 1}, true},
      {37, 0, {130, 70}, {1, 4}, true},
      {3, 7, {10, 20, 30, 40, 50, 60, 70, 80}, {1, 2, 3, 4, 5, 6, 7, 8}, false},
      {2, 0, {600}, {1}, false},
  };
  int n = 0;
  for (const QP& c : cases) {
    const int64_t S = int64_t(c.klens.size()), K = std::accumulate(c.klens.begin(), c.klens.end(), int64_t(0));
    const int64_t ldx = K + c.ldx_pad;
    std::vector<int64_t> perm(static_cast<size_t>(K)), segs;
    std::iota(perm.begin(), perm.end(), 0);
    if (n % 2) std::shuffle(perm.begin(), perm.end(), g_rng);  // gathered and in-place runs
    std::vector<float> seg_scale;
    std::uniform_real_distribution<float> sc(0.05f, 0.5f);
    for (int64_t s = 0; s < S; ++s) {
      segs.insert(segs.end(), {c.klens[size_t(s)], (c.klens[size_t(s)] + 63) / 64, c.bits[size_t(s)]});
      seg_scale.push_back(sc(g_rng));
    }
    const soniq::ActLayout L{K, perm.data(), S, segs.data(), seg_scale.data()};
    const int64_t words = soniq::act_row_words(L);
    std::vector<float> x(static_cast<size_t>(c.M * ldx));
    std::normal_distribution<float> nd(0.0f, 3.0f);
    for (size_t i = 0; i < x.size(); ++i) x[i] = nd(g_rng);
    // exact ties (k + 1/2) * scale and values far outside the range
    for (int64_t k = 0; k < K && k < 40; ++k) {
      int64_t s = 0, k0 = 0;
      while (k >= k0 + c.klens[size_t(s)]) k0 += c.klens[size_t(s++)];
      x[size_t(perm[size_t(k)])] = (float(k % 9) - 4.5f) * seg_scale[size_t(s)];
    }
    x[size_t(c.M * ldx - 1 - c.ldx_pad)] = 1e30f;
    if (c.M > 2) {  // a row of zeros (dynamic scale 1) and an infinity (skipped by the row max)
      std::fill(x.begin() + ldx, x.begin() + ldx + K, 0.0f);
      x[size_t(2 * ldx)] = -std::numeric_limits<float>::infinity();
    }
    std::vector<uint64_t> want(static_cast<size_t>(c.M * words)), got(want.size(), 0x5a5a5a5a5a5a5a5aull);
    std::vector<int64_t> want_sums(static_cast<size_t>(c.M * S)), got_sums(want_sums.size(), 0);
    const std::string tag = "quantize_pack case " + std::to_string(n++);
    int flags = 0;
    try {
      // round to nearest, then stochastic rounding (the same Philox draws as the CPU)
      // static and per-token dynamic scales (row scales equal too)
      for (const soniq::ActNoise noise : {soniq::ActNoise{0, 0}, soniq::ActNoise{1, 0x0123456789abcdefull}})
        for (const bool dyn : {false, true}) {
          std::vector<float> want_rs(size_t(c.M), -1.0f), got_rs(size_t(c.M), -2.0f);
          soniq::quantize_pack(x.data(), c.M, ldx, L, c.is_signed, want.data(), want_sums.data(), noise, nullptr,
                               dyn ? want_rs.data() : nullptr);
          std::fill(got.begin(), got.end(), 0x5a5a5a5a5a5a5a5aull);  // every word must be written again
          std::fill(got_sums.begin(), got_sums.end(), 0);
          flags = 0;
          soniq::cuda::quantize_pack(x.data(), c.M, ldx, perm.data(), K, S, segs.data(), seg_scale.data(),
                                     c.is_signed, got.data(), got_sums.data(), &flags, nullptr, noise, nullptr,
                                     dyn ? got_rs.data() : nullptr);
          expect(flags == 0 && got == want && got_sums == want_sums && (!dyn || got_rs == want_rs),
                 tag + " noise=" + std::to_string(noise.mode) + " dynamic=" + std::to_string(dyn) +
                     ": planes, sums or row scales differ from the CPU's");
        }
      // a NaN and a perm entry out of range are flagged, not read; NaN rows as the CPU marks them
      if (c.M > 1) {
        x[size_t(ldx)] = std::nanf("");
        std::fill(got_sums.begin(), got_sums.end(), 0);
        std::vector<uint8_t> rows_gpu(size_t(c.M), 0), rows_cpu(size_t(c.M), 7);
        soniq::cuda::quantize_pack(x.data(), c.M, ldx, perm.data(), K, S, segs.data(), seg_scale.data(),
                                   c.is_signed, got.data(), got_sums.data(), &flags, rows_gpu.data(), {}, nullptr);
        soniq::quantize_pack(x.data(), c.M, ldx, L, c.is_signed, want.data(), want_sums.data(), {}, rows_cpu.data());
        std::vector<uint8_t> rows_want(size_t(c.M), 0);
        rows_want[1] = 1;
        expect(flags == 1 && rows_gpu == rows_want && rows_cpu == rows_want,
               tag + ": NaN sets flag bit 0 and marks its row (CUDA and CPU)");
      }
      perm[0] = K + 5;
      flags = 0;
      std::fill(got_sums.begin(), got_sums.end(), 0);
      soniq::cuda::quantize_pack(x.data(), c.M, ldx, perm.data(), K, S, segs.data(), seg_scale.data(), c.is_signed,
                                 got.data(), got_sums.data(), &flags, nullptr, {}, nullptr);
      expect((flags & 2) != 0, tag + ": a perm entry outside [0, K) sets flag bit 1");
    } catch (const std::exception& e) {
      expect(false, tag + ": threw " + e.what());
    }
  }
}

// ---- the emulator catches what a GPU would get wrong -------------------------------------
__global__ void racy_kernel(int* out, bool with_barrier) {
  SONIQ_DYNAMIC_SMEM(int, s);
  const int t = int(threadIdx.x), n = int(blockDim.x);
  s[t] = t;
  if (with_barrier) __syncthreads();
  out[t] = s[(t + 1) % n];
}

__global__ void diverged_kernel(int* out) {
  // half of warp 0 shuffles while the other half waits at the block barrier
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
  __syncthreads();
}

// This lane's fragments of A (16 x K, row-major) and B (K x 8, [k][n]) for an mma shape
// with EB-bit elements: 32 / EB per register, low bits first, K = 8 * that; a0 row g, a1 row
// g + 8, a2 / a3 the same rows at k + K/2; b0 / b1 column g at k and k + K/2 (PTX ISA
// "Matrix Fragments" for m16n8k32 u8, m16n8k64 u4, m16n8k256 b1).
template <int EB>
__device__ void fragments(const uint8_t* A, const uint8_t* B, int lane, unsigned (&a)[4], unsigned (&b)[2]) {
  constexpr int per = 32 / EB, K = 8 * per;
  const int g = lane / 4, t = lane % 4;
  for (int reg = 0; reg < 4; ++reg) {
    a[reg] = 0;
    for (int j = 0; j < per; ++j)
      a[reg] |= unsigned(A[(g + 8 * (reg & 1)) * K + (K / 2) * (reg >> 1) + per * t + j]) << (EB * j);
  }
  for (int reg = 0; reg < 2; ++reg) {
    b[reg] = 0;
    for (int j = 0; j < per; ++j) b[reg] |= unsigned(B[((K / 2) * reg + per * t + j) * 8 + g]) << (EB * j);
  }
}

// c -> D (16 x 8) from this lane's accumulator fragment (c0, c1 row g; c2, c3 row g + 8).
__device__ void store_accumulators(const int (&c)[4], int lane, int* D) {
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) D[(g + 8 * (e >> 1)) * 8 + 2 * t + (e & 1)] = c[e];
}

// One warp multiplies a 16x32 u8 A by a 32x8 u8 B through the mma fragments of ptx.cuh;
// swap_regs swaps a1 and a2 (a wrong fragment) to show such a bug is caught.
__global__ void mma_kernel(const uint8_t* A, const uint8_t* B, int* D, bool swap_regs, int c0) {
  const int lane = int(threadIdx.x);
  unsigned a[4], b[2];
  fragments<8>(A, B, lane, a, b);
  if (swap_regs) std::swap(a[1], a[2]);
  int c[4] = {c0 + 1, c0 + 2, c0 + 3, c0 + 4};
  soniq::cuda::detail::mma_u8_m16n8k32(c, a[0], a[1], a[2], a[3], b[0], b[1]);
  store_accumulators(c, lane, D);
}

// The same for the u4 shape: A 16x64, B 64x8, codes 0..15, 8 per register.
__global__ void mma4_kernel(const uint8_t* A, const uint8_t* B, int* D) {
  const int lane = int(threadIdx.x);
  unsigned a[4], b[2];
  fragments<4>(A, B, lane, a, b);
  int c[4] = {0, 0, 0, 0};
  soniq::cuda::detail::mma_u4_m16n8k64(c, a[0], a[1], a[2], a[3], b[0], b[1]);
  store_accumulators(c, lane, D);
}

// The same for the binary shape: A 16x256 bits, B 256x8 bits (one byte per bit here).
__global__ void bmma_kernel(const uint8_t* A, const uint8_t* B, int* D) {
  const int lane = int(threadIdx.x);
  unsigned a[4], b[2];
  fragments<1>(A, B, lane, a, b);
  int d[4];
  soniq::cuda::detail::mma_b1_m16n8k256(d, a[0], a[1], a[2], a[3], b[0], b[1]);
  store_accumulators(d, lane, D);
}

// A random 16 x K times K x 8 problem with codes 0..max_code (A row-major, B [k][n]) and its
// product, plus c = {1, 2, 3, 4} per fragment position when with_c (mma_kernel's start).
struct MmaProblem {
  std::vector<uint8_t> A, B;
  std::vector<int> want;
};
MmaProblem mma_problem(int K, int max_code, bool with_c) {
  MmaProblem p{std::vector<uint8_t>(size_t(16 * K)), std::vector<uint8_t>(size_t(K * 8)), std::vector<int>(16 * 8)};
  for (auto& v : p.A) v = uint8_t(rnd(0, max_code));
  for (auto& v : p.B) v = uint8_t(rnd(0, max_code));
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      int acc = with_c ? 1 + (i >= 8 ? 2 : 0) + (j % 2) : 0;
      for (int k = 0; k < K; ++k) acc += int(p.A[size_t(i * K + k)]) * int(p.B[size_t(k * 8 + j)]);
      p.want[size_t(i * 8 + j)] = acc;
    }
  return p;
}

void test_emulator_catches_bugs() {
  const int n = 64;
  std::vector<int> out(n, -1);
  SONIQ_LAUNCH(dim3(1), dim3(n), n * sizeof(int), nullptr, racy_kernel)(out.data(), true);
  bool ok = cudaGetLastError() == cudaSuccess;
  for (int t = 0; t < n; ++t) ok = ok && out[size_t(t)] == (t + 1) % n;
  expect(ok, "self-test: barrier kernel gives the right answer");
  SONIQ_LAUNCH(dim3(1), dim3(n), n * sizeof(int), nullptr, racy_kernel)(out.data(), false);
  bool wrong = false;
  for (int t = 0; t < n; ++t) wrong = wrong || out[size_t(t)] != (t + 1) % n;
  expect(wrong, "self-test: a missing __syncthreads is visible (stale shared memory read)");

  SONIQ_LAUNCH(dim3(1), dim3(64), 0, nullptr, diverged_kernel)(out.data());
  expect(cudaGetLastError() == cudaErrorLaunchFailure, "self-test: a diverged warp collective fails the launch");

  MmaProblem p = mma_problem(32, 255, true);
  std::vector<int> D(16 * 8);
  SONIQ_LAUNCH(dim3(1), dim3(32), 0, nullptr, mma_kernel)(p.A.data(), p.B.data(), D.data(), false, 0);
  expect(cudaGetLastError() == cudaSuccess && D == p.want, "self-test: mma m16n8k32 u8 fragments give A*B + C");
  SONIQ_LAUNCH(dim3(1), dim3(32), 0, nullptr, mma_kernel)(p.A.data(), p.B.data(), D.data(), true, 0);
  expect(D != p.want, "self-test: a wrong mma fragment is visible");
  std::fill(p.A.begin(), p.A.end(), uint8_t(255));
  std::fill(p.B.begin(), p.B.end(), uint8_t(255));
  // c + 32 x 255^2 past 2^31 - 1: the GPU would wrap silently, the emulator fails the launch
  SONIQ_LAUNCH(dim3(1), dim3(32), 0, nullptr, mma_kernel)(p.A.data(), p.B.data(), D.data(), false, 2147483647 - 2000000);
  expect(cudaGetLastError() == cudaErrorLaunchFailure, "self-test: an s32 mma accumulator overflow fails the launch");

  p = mma_problem(256, 1, false);  // bits: AND + popcount is the product of 0/1 values
  SONIQ_LAUNCH(dim3(1), dim3(32), 0, nullptr, bmma_kernel)(p.A.data(), p.B.data(), D.data());
  expect(cudaGetLastError() == cudaSuccess && D == p.want, "self-test: mma m16n8k256 b1 and.popc fragments");

  p = mma_problem(64, 15, false);
  SONIQ_LAUNCH(dim3(1), dim3(32), 0, nullptr, mma4_kernel)(p.A.data(), p.B.data(), D.data());
  expect(cudaGetLastError() == cudaSuccess && D == p.want, "self-test: mma m16n8k64 u4 fragments give A*B");
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--seed") && i + 1 < argc) g_rng.seed(std::stoull(argv[++i]));
    else {
      std::fprintf(stderr, "usage: %s [--quick] [--seed N]\n", argv[0]);
      return 2;
    }
  }
  const char* order = std::getenv("SONIQ_EMU_ORDER");
  const char* copies = std::getenv("SONIQ_EMU_CP_ASYNC");
  std::printf("soniq CUDA kernels on the CPU emulator (thread order: %s, cp.async: %s)\n", order ? order : "forward",
              copies ? copies : "late");

  {
    Section sec("emulator self-tests");
    test_emulator_catches_bugs();
  }
  {
    Section sec("kernel choice (INT4 on sm_80-89)");
    test_kernel_choice();
  }
  {
    Section sec("expand_codes");
    test_expand_codes();
  }
  {
    Section sec("quantize_pack (fused activations)");
    test_quantize_pack();
  }
  {
    Section sec("quantize, philox_uniform");
    test_quantize_t<float>("float32");
    test_quantize_t<double>("float64");
  }

  // every bit pair, both signednesses, on small shapes (one tile, 1-2 chunks)
  {
  Section sec("mpgemm: every bit pair");
  for (int pa = 1; pa <= 8; ++pa)
    for (int pb = 1; pb <= 8; ++pb) {
      Case c;
      c.name = "bits " + std::to_string(pa) + "x" + std::to_string(pb);
      c.la = uniform(quick ? 3 : rnd(1, 20), {pa});
      c.lb = uniform(rnd(1, 40), {pb});
      c.klens = {rnd(1, 300)};
      c.a_signed = (pa + pb) % 2 == 0;
      c.b_signed = pb % 3 != 0;
      c.float_out = (pa * pb) % 5 == 0;
      run_case(c);
    }
  }

  std::vector<Case> shapes;
  auto add = [&](std::string name, Layout la, Layout lb, std::vector<int64_t> klens) {
    Case c;
    c.name = std::move(name);
    c.la = std::move(la);
    c.lb = std::move(lb);
    c.klens = std::move(klens);
    shapes.push_back(c);
    return &shapes.back();
  };
  add("M=1 N=1 K=1", uniform(1, {4}), uniform(1, {2}), {1});
  add("M=1 GEMV K=1000 (4 popc stages)", uniform(1, {8}), uniform(70, {4}), {1000});
  add("M=16 GEMV W2A8 K=777", uniform(16, {8}), uniform(33, {2}), {777});
  add("M=5 N=1 K=65", uniform(5, {3}), uniform(1, {5}), {65});
  add("M=70 N=130 K=300: several 64x64 tiles", uniform(70, {2}), uniform(130, {3}), {300});
  add("M=17 N=200 K=129: 16-row groups x 128-wide mma tiles", Layout{{9, 8}, {{4}, {8}}}, uniform(200, {2}), {129});
  add("two tiers on rows of both", Layout{{7, 12}, {{2}, {6}}}, Layout{{20, 9, 4}, {{1}, {4}, {8}}}, {200});
  add("two tiers along K", uniform(6, {2, 8}), uniform(19, {4, 3}), {70, 130});
  add("two tiers on rows and along K", Layout{{5, 3}, {{1, 4, 2}, {8, 2, 5}}}, Layout{{11, 30}, {{3, 3, 7}, {8, 1, 2}}},
      {64, 1, 190});
  add("8 groups x 8 segments", Layout{{1, 2, 3, 1, 2, 1, 1, 2}, std::vector<std::vector<int>>(8, {1, 2, 3, 4, 5, 6, 7, 8})},
      Layout{{30, 9}, {{8, 7, 6, 5, 4, 3, 2, 1}, {1, 1, 2, 2, 3, 3, 4, 4}}}, {1, 2, 63, 64, 65, 127, 128, 129});
  add("b in 8 groups", uniform(3, {4}), Layout{{3, 1, 4, 1, 5, 9, 2, 6}, {{1}, {2}, {3}, {4}, {5}, {6}, {7}, {8}}}, {100});
  Case* c = add("kw padded to even (16-byte cp.async), zeros read", uniform(9, {5}), uniform(21, {7}), {70});
  c->pad_kw = true;
  c = add("a 8-byte aligned (8-byte cp.async)", uniform(33, {3}), uniform(17, {2}), {520});
  c->misalign = true;
  c = add("a 8-byte aligned, 1-bit x 1-bit", uniform(4, {1}), uniform(66, {1}), {300});
  c->misalign = true;
  c->a_signed = c->b_signed = true;
  if (!quick) {
    // past the s32 flush points (16384 K) with the largest codes: an unflushed
    // accumulator overflows, which the emulator reports
    // (33025 * 255^2 > 2^31: one s32 accumulator over all of K would overflow)
    c = add("long K 8x8 bits all-255 codes (mma flush)", uniform(3, {8}), uniform(8, {8}), {33025 + 200});
    c->extreme = true;
    c->a_signed = c->b_signed = false;
    c->kernels = {"mma", "mma4", "gemv", "popc"};
    c = add("long K 8x8 bits all-255 codes (bmma flush)", uniform(2, {8}), uniform(8, {8}), {33025 + 300});
    c->extreme = true;
    c->a_signed = c->b_signed = false;
    c->kernels = {"bmma"};
  }
  for (const Case& s : shapes) {
    Section sec(s.name.c_str());
    run_case(s);
  }

  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
