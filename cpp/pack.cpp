#include "pack.h"

#include <stdexcept>
#include <algorithm>
#include <string>
#include <vector>

#include "dispatch.h"
#include "threadpool.h"

namespace soniq {
namespace {

void check_block(int64_t rows, int64_t klen, int64_t ld, int bits, int64_t kw) {
  if (rows <= 0 || klen <= 0) throw std::invalid_argument("block must be non-empty");
  if (bits < 1 || bits > 8) throw std::invalid_argument("bits must be in 1..8, got " + std::to_string(bits));
  if (kw * 64 < klen) throw std::invalid_argument("kw*64 must be >= klen");
  if (ld < klen) throw std::invalid_argument("ld must be >= klen");
}

constexpr int64_t kRowsPerTask = 64;

}  // namespace

void pack_block(const uint8_t* codes, int64_t rows, int64_t klen, int64_t ld, int bits, int64_t kw,
                uint64_t* out) {
  check_block(rows, klen, ld, bits, kw);
  const KernelTable& kt = active_kernels();
  // Planes are [bits][rows][kw]; a task packs a run of rows into a scratch block and
  // scatters its planes, so tasks never share output words.
  const int64_t ntasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(ntasks, [&](int64_t t) {
    const int64_t r0 = t * kRowsPerTask, nr = std::min(kRowsPerTask, rows - r0);
    if (ntasks == 1) {
      kt.pack_planes(codes, rows, klen, ld, bits, kw, out);
      return;
    }
    std::vector<uint64_t> tmp(size_t(bits * nr * kw));
    kt.pack_planes(codes + r0 * ld, nr, klen, ld, bits, kw, tmp.data());
    for (int p = 0; p < bits; ++p)
      std::copy(tmp.begin() + p * nr * kw, tmp.begin() + (p + 1) * nr * kw, out + (p * rows + r0) * kw);
  });
}

void unpack_block(const uint64_t* planes, int64_t rows, int64_t klen, int bits, int64_t kw,
                  uint8_t* out, int64_t ld) {
  check_block(rows, klen, ld, bits, kw);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < klen; ++k) {
      unsigned c = 0;
      for (int p = 0; p < bits; ++p) c |= unsigned((planes[(p * rows + r) * kw + (k >> 6)] >> (k & 63)) & 1u) << p;
      out[r * ld + k] = uint8_t(c);
    }
}

}  // namespace soniq
