#include "wlayout.h"

#include <algorithm>
#include <cstring>

#include "threadpool.h"

namespace soniq {
namespace {

struct Part { int width, pos, vec; };  // width, bit position in the code, first vector

int parts_of(int bits, Part* p) {
  const auto& widths = kLayoutPartWidths;
  int n = 0, pos = 0;
  for (int i = 0; i < 3 && widths[bits][i]; ++i) {
    p[n++] = Part{widths[bits][i], pos, pos};
    pos += widths[bits][i];
  }
  return n;
}

int64_t tiles_of(int64_t rows) { return (rows + kLayoutTile - 1) / kLayoutTile; }

// codes [16][kw*64] of one tile (rows past the block are zero) <-> the tile's layout bytes
void tile_encode(const uint8_t* codes, int64_t kw, int bits, int8_t* out) {
  Part parts[3];
  const int np = parts_of(bits, parts);
  const int64_t nchunks = 2 * kw, ld = kw * 64;
  std::memset(out, 0, size_t(layout_tile_bytes(bits, kw)));
  for (int64_t c = 0; c < nchunks; ++c) {
    uint8_t* ch = reinterpret_cast<uint8_t*>(out) + c * bits * 64;
    for (int g = 0; g < 8; ++g)
      for (int j = 0; j < kLayoutTile; ++j)
        for (int kk = 0; kk < 4; ++kk) {
          const unsigned u = codes[j * ld + c * 32 + g * 4 + kk];
          const int byte = j * 4 + kk;
          if (bits == 8) {
            ch[g * 64 + byte] = uint8_t(u ^ 0x80u);
            continue;
          }
          for (int q = 0; q < np; ++q) {
            const Part& P = parts[q];
            const int per = 8 / P.width;
            const unsigned v = (u >> P.pos) & ((1u << P.width) - 1u);
            ch[(P.vec + g / per) * 64 + byte] |= uint8_t(v << ((g % per) * P.width));
          }
        }
  }
}

void tile_decode(const int8_t* in, int64_t kw, int bits, uint8_t* codes) {
  Part parts[3];
  const int np = parts_of(bits, parts);
  const int64_t nchunks = 2 * kw, ld = kw * 64;
  for (int64_t c = 0; c < nchunks; ++c) {
    const uint8_t* ch = reinterpret_cast<const uint8_t*>(in) + c * bits * 64;
    for (int g = 0; g < 8; ++g)
      for (int j = 0; j < kLayoutTile; ++j)
        for (int kk = 0; kk < 4; ++kk) {
          const int byte = j * 4 + kk;
          unsigned u = 0;
          if (bits == 8) {
            u = ch[g * 64 + byte] ^ 0x80u;
          } else {
            for (int q = 0; q < np; ++q) {
              const Part& P = parts[q];
              const int per = 8 / P.width;
              u |= ((unsigned(ch[(P.vec + g / per) * 64 + byte]) >> ((g % per) * P.width)) &
                    ((1u << P.width) - 1u)) << P.pos;
            }
          }
          codes[j * ld + c * 32 + g * 4 + kk] = uint8_t(u);
        }
  }
}

// planes [bits][rows][kw] rows r0..r0+16 <-> codes [16][kw*64] (bits of each word, LSB first)
void planes_to_codes(const uint64_t* planes, int bits, int64_t rows, int64_t kw, int64_t r0, uint8_t* codes) {
  const int64_t ld = kw * 64;
  std::memset(codes, 0, size_t(kLayoutTile * ld));
  for (int64_t j = 0; j < kLayoutTile && r0 + j < rows; ++j)
    for (int p = 0; p < bits; ++p) {
      const uint64_t* w = planes + (p * rows + r0 + j) * kw;
      for (int64_t k = 0; k < ld; ++k) codes[j * ld + k] |= uint8_t(((w[k >> 6] >> (k & 63)) & 1u) << p);
    }
}

void codes_to_planes(const uint8_t* codes, int bits, int64_t rows, int64_t kw, int64_t r0, uint64_t* planes) {
  const int64_t ld = kw * 64;
  for (int64_t j = 0; j < kLayoutTile && r0 + j < rows; ++j)
    for (int p = 0; p < bits; ++p) {
      uint64_t* w = planes + (p * rows + r0 + j) * kw;
      for (int64_t wi = 0; wi < kw; ++wi) {
        uint64_t x = 0;
        for (int k = 0; k < 64; ++k) x |= uint64_t((codes[j * ld + wi * 64 + k] >> p) & 1u) << k;
        w[wi] = x;
      }
    }
}

template <class F>
void for_each_tile(const int64_t* desc, int64_t ngroups, const int64_t* ksegs, int64_t nsegs, F&& f) {
  struct Job { int64_t g, s, t; };
  std::vector<Job> jobs;
  for (int64_t g = 0; g < ngroups; ++g)
    for (int64_t s = 0; s < nsegs; ++s)
      for (int64_t t = 0; t < tiles_of(desc[g * (2 + nsegs) + 1]); ++t) jobs.push_back({g, s, t});
  parallel_for(int64_t(jobs.size()), [&](int64_t i) { f(jobs[size_t(i)].g, jobs[size_t(i)].s, jobs[size_t(i)].t); });
}

std::vector<int64_t> plane_offsets(const int64_t* desc, int64_t ngroups, const int64_t* ksegs, int64_t nsegs) {
  std::vector<int64_t> off(size_t(ngroups * nsegs));
  int64_t o = 0;
  for (int64_t g = 0; g < ngroups; ++g)
    for (int64_t s = 0; s < nsegs; ++s) {
      off[size_t(g * nsegs + s)] = o;
      o += desc[g * (2 + nsegs) + 2 + s] * desc[g * (2 + nsegs) + 1] * ksegs[2 * s + 1];
    }
  return off;
}

}  // namespace

std::vector<int64_t> layout_offsets(const int64_t* desc, int64_t ngroups, const int64_t* ksegs, int64_t nsegs) {
  std::vector<int64_t> off(size_t(ngroups * nsegs + 1));
  int64_t o = 0;
  for (int64_t g = 0; g < ngroups; ++g)
    for (int64_t s = 0; s < nsegs; ++s) {
      off[size_t(g * nsegs + s)] = o;
      const int bits = int(desc[g * (2 + nsegs) + 2 + s]);
      o += tiles_of(desc[g * (2 + nsegs) + 1]) * layout_tile_bytes(bits, ksegs[2 * s + 1]);
    }
  off.back() = o;
  return off;
}

void layout_build(const PackedOperand& b, const int64_t* ksegs, int64_t nsegs, int8_t* out) {
  const auto lo = layout_offsets(b.desc, b.ngroups, ksegs, nsegs);
  const auto po = plane_offsets(b.desc, b.ngroups, ksegs, nsegs);
  for_each_tile(b.desc, b.ngroups, ksegs, nsegs, [&](int64_t g, int64_t s, int64_t t) {
    const int64_t rows = b.desc[g * (2 + nsegs) + 1], kw = ksegs[2 * s + 1];
    const int bits = int(b.desc[g * (2 + nsegs) + 2 + s]);
    std::vector<uint8_t> codes(size_t(kLayoutTile * kw * 64));
    planes_to_codes(b.data + po[size_t(g * nsegs + s)], bits, rows, kw, t * kLayoutTile, codes.data());
    tile_encode(codes.data(), kw, bits, out + lo[size_t(g * nsegs + s)] + t * layout_tile_bytes(bits, kw));
  });
}

void layout_to_planes(const int8_t* layout, const int64_t* desc, int64_t ngroups, const int64_t* ksegs,
                      int64_t nsegs, uint64_t* data) {
  const auto lo = layout_offsets(desc, ngroups, ksegs, nsegs);
  const auto po = plane_offsets(desc, ngroups, ksegs, nsegs);
  for_each_tile(desc, ngroups, ksegs, nsegs, [&](int64_t g, int64_t s, int64_t t) {
    const int64_t rows = desc[g * (2 + nsegs) + 1], kw = ksegs[2 * s + 1];
    const int bits = int(desc[g * (2 + nsegs) + 2 + s]);
    std::vector<uint8_t> codes(size_t(kLayoutTile * kw * 64));
    tile_decode(layout + lo[size_t(g * nsegs + s)] + t * layout_tile_bytes(bits, kw), kw, bits, codes.data());
    codes_to_planes(codes.data(), bits, rows, kw, t * kLayoutTile, data + po[size_t(g * nsegs + s)]);
  });
}

}  // namespace soniq
