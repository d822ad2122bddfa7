// AMX-TILE / AMX-INT8 emulated in plain C++ (per-thread tile state), so the AMX kernels
// (kernels_amx.inl) run and are tested on CPUs without AMX, as tests/cuda_emu does for CUDA.
// Follows Intel's pseudo-code (SDM vol. 2, LDTILECFG / TILELOADD / TILESTORED / TILEZERO /
// TDPBUSD); where the hardware faults (#UD/#GP) on a bad configuration or shape this throws
// std::logic_error, so a kernel bug fails its test instead of passing on a lenient emulator.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>

namespace soniq::amx_emu {
namespace {  // one includer (kernels_amx_emu.cpp): no shared inline copies with other objects

struct TileConfig {  // the 64-byte LDTILECFG operand
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

struct TileState {
  bool configured = false;
  TileConfig cfg{};
  alignas(64) uint8_t t[8][16][64]{};
};

inline TileState& state() {
  thread_local TileState s;
  return s;
}

// (char buffers, not std::string: no std:: template copies in this AVX-512 object)
[[noreturn]] void fault(const char* what) {
  char msg[160];
  std::snprintf(msg, sizeof msg, "AMX emulation: %s", what);
  throw std::logic_error(msg);
}

inline void check_tile(int t) {
  const TileState& s = state();
  if (!s.configured) fault("tile instruction before LDTILECFG");
  if (t < 0 || t > 7) fault("tile register out of range");
  if (s.cfg.rows[t] == 0 || s.cfg.colsb[t] == 0) fault("a tile used is not configured (zero rows)");
}

// palette 1: 8 tiles of at most 16 rows x 64 bytes; palette 0 releases (INIT state)
inline void loadconfig(const void* p) {
  TileState& s = state();
  TileConfig c;
  std::memcpy(&c, p, sizeof c);
  if (c.palette == 0) {
    s = TileState{};
    return;
  }
  if (c.palette != 1) fault("palette must be 0 or 1");
  for (int i = 0; i < 14; ++i)
    if (c.reserved[i]) fault("reserved bytes of the tile configuration must be zero");
  for (int t = 0; t < 16; ++t) {
    const bool used = t < 8;
    if (!used && (c.rows[t] || c.colsb[t])) fault("palette 1 has 8 tiles");
    if (c.rows[t] > 16 || c.colsb[t] > 64) fault("a tile holds at most 16 rows of 64 bytes");
    if ((c.rows[t] == 0) != (c.colsb[t] == 0)) fault("a tile's rows and bytes per row are both zero or both set");
  }
  s.cfg = c;
  s.configured = true;
  std::memset(s.t, 0, sizeof s.t);
}

inline void release() { state() = TileState{}; }

inline void zero(int t) {
  check_tile(t);
  std::memset(state().t[t], 0, sizeof state().t[t]);
}

// rows x colsb bytes from base (row r at base + r * stride); the rest of the register zeroed
inline void loadd(int t, const void* base, int64_t stride) {
  check_tile(t);
  TileState& s = state();
  std::memset(s.t[t], 0, sizeof s.t[t]);
  for (int r = 0; r < s.cfg.rows[t]; ++r)
    std::memcpy(s.t[t][r], static_cast<const uint8_t*>(base) + r * stride, s.cfg.colsb[t]);
}

inline void stored(int t, void* base, int64_t stride) {
  check_tile(t);
  const TileState& s = state();
  for (int r = 0; r < s.cfg.rows[t]; ++r)
    std::memcpy(static_cast<uint8_t*>(base) + r * stride, s.t[t][r], s.cfg.colsb[t]);
}

// c.row[m].dword[n] += sum_{k < colsb(a)/4} sum_{i < 4} u8(a.row[m].byte[4k+i]) * s8(b.row[k].byte[4n+i]),
// wrapping as the hardware does (no saturation)
inline void dpbusd(int c, int a, int b) {
  check_tile(c), check_tile(a), check_tile(b);
  if (c == a || c == b || a == b) fault("TDPBUSD needs three distinct tiles");
  TileState& s = state();
  const TileConfig& g = s.cfg;
  if (g.rows[a] != g.rows[c] || g.colsb[b] != g.colsb[c] || g.colsb[a] != 4 * g.rows[b] || g.colsb[c] % 4)
    fault("TDPBUSD shapes do not match (rows(a) == rows(c), colsb(b) == colsb(c), colsb(a) == 4 rows(b))");
  for (int m = 0; m < g.rows[c]; ++m)
    for (int n = 0; n < g.colsb[c] / 4; ++n) {
      uint32_t acc;
      std::memcpy(&acc, s.t[c][m] + 4 * n, 4);
      for (int k = 0; k < g.colsb[a] / 4; ++k)
        for (int i = 0; i < 4; ++i)
          acc += uint32_t(int32_t(s.t[a][m][4 * k + i]) * int32_t(int8_t(s.t[b][k][4 * n + i])));
      std::memcpy(s.t[c][m] + 4 * n, &acc, 4);
    }
}

}  // namespace
}  // namespace soniq::amx_emu
