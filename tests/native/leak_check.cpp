// Leak and memory-error check of the native core through its C++ API (issue 7.1).
// Built with -fsanitize=address,undefined by .ci/reliability.sh and run with LeakSanitizer
// on: loops pack + mpgemm (all output kinds, every ISA path this CPU has, several thread
// counts, and the error paths that throw) and checks each product against a naive one.
// Exit status 0 = clean; a sanitizer report or a wrong product exits non-zero.
#include <cstdint>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpp/dispatch.h"
#include "cpp/mpgemm.h"
#include "cpp/pack.h"
#include "cpp/threadpool.h"

using namespace soniq;

namespace {

struct Packed {  // one row group, one K segment
  std::vector<uint64_t> data;
  std::vector<int64_t> desc, sums, perm;
  PackedOperand op(bool is_signed) const {
    return PackedOperand{data.data(), int64_t(perm.size()), 1, desc.data(), sums.data(), perm.data(), is_signed};
  }
};

Packed pack_codes(const std::vector<uint8_t>& codes, int64_t rows, int64_t K, int bits) {
  const int64_t kw = (K + 63) / 64;
  Packed p;
  p.data.resize(size_t(bits * rows * kw));
  pack_block(codes.data(), rows, K, K, bits, kw, p.data.data());
  p.desc = {0, rows, bits};
  p.sums.resize(size_t(rows));
  p.perm.resize(size_t(rows));
  for (int64_t r = 0; r < rows; ++r) {
    int64_t s = 0;
    for (int64_t k = 0; k < K; ++k) s += codes[size_t(r * K + k)];
    p.sums[size_t(r)] = s;
    p.perm[size_t(r)] = rows - 1 - r;  // a non-trivial permutation
  }
  std::vector<uint8_t> back(codes.size());
  unpack_block(p.data.data(), rows, K, bits, kw, back.data(), K);
  if (back != codes) throw std::runtime_error("unpack(pack(codes)) != codes");
  return p;
}

int64_t value(uint8_t code, int bits, bool is_signed) {
  const CodeEncoding e = code_encoding(bits, is_signed);
  return e.alpha * code + e.offset;
}

template <class F>
bool throws(F f) {
  try {
    f();
  } catch (const std::exception&) {
    return true;
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  const int iters = argc > 1 ? std::stoi(argv[1]) : 300;
  std::mt19937_64 rng(42);
  int failures = 0;
  const auto isas = supported_isas();
  for (int it = 0; it < iters; ++it) {
    set_isa(isas[size_t(it) % isas.size()]);
    set_num_threads(1 + it % 3);
    const int64_t M = 1 + int64_t(rng() % 40), N = 1 + int64_t(rng() % 90), K = 1 + int64_t(rng() % 300);
    const int ba = 1 + int(rng() % 8), bb = 1 + int(rng() % 8);
    const bool sa = rng() & 1, sb = rng() & 1;
    std::vector<uint8_t> ca(size_t(M * K)), cb(size_t(N * K));
    for (auto& c : ca) c = uint8_t(rng() & ((1u << ba) - 1));
    for (auto& c : cb) c = uint8_t(rng() & ((1u << bb) - 1));
    const Packed pa = pack_codes(ca, M, K, ba), pb = pack_codes(cb, N, K, bb);
    const int64_t ksegs[2] = {K, (K + 63) / 64};

    std::vector<int32_t> o32(size_t(M * N));
    std::vector<int64_t> o64(size_t(M * N));
    std::vector<float> of(size_t(M * N));
    std::vector<float> sca(size_t(M), 0.5f), scb(size_t(N), 0.25f);
    mpgemm(pa.op(sa), pb.op(sb), ksegs, 1, Scales{}, OutKind::Int64, o64.data());
    mpgemm(pa.op(sa), pb.op(sb), ksegs, 1, Scales{}, OutKind::Int32, o32.data());
    mpgemm(pa.op(sa), pb.op(sb), ksegs, 1, Scales{sca.data(), scb.data(), nullptr, nullptr}, OutKind::Float32,
           of.data());
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        int64_t ref = 0;
        for (int64_t k = 0; k < K; ++k)
          ref += value(ca[size_t(i * K + k)], ba, sa) * value(cb[size_t(j * K + k)], bb, sb);
        const size_t idx = size_t(pa.perm[size_t(i)] * N + pb.perm[size_t(j)]);
        if (o64[idx] != ref || o32[idx] != int32_t(ref) || of[idx] != float(double(ref) * 0.5 * 0.25)) {
          if (failures++ < 5) std::fprintf(stderr, "mismatch at it=%d (%lld, %lld)\n", it, (long long)i, (long long)j);
        }
      }

    // error paths must throw (and not leak)
    Packed bad = pb;
    bad.perm[0] = N;  // out of range
    if (!throws([&] { mpgemm(pa.op(sa), bad.op(sb), ksegs, 1, Scales{}, OutKind::Int64, o64.data()); })) ++failures;
    bad = pb;
    bad.desc[2] = 9;  // bits out of range
    if (!throws([&] { mpgemm(pa.op(sa), bad.op(sb), ksegs, 1, Scales{}, OutKind::Int64, o64.data()); })) ++failures;
    const int64_t short_kw[2] = {K, 0};
    if (!throws([&] { mpgemm(pa.op(sa), pb.op(sb), short_kw, 1, Scales{}, OutKind::Int64, o64.data()); })) ++failures;
    if (!throws([&] { pack_block(ca.data(), M, K, K, 9, ksegs[1], nullptr); })) ++failures;
    if (!throws([&] { set_num_threads(0); })) ++failures;
    if (!throws([&] { set_isa("bogus"); })) ++failures;
  }
  std::printf("leak_check: %d iterations on %zu ISA paths, %d failures\n", iters, isas.size(), failures);
  return failures == 0 ? 0 : 1;
}
