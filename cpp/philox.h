// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
// shared by the C++ and CUDA quantizers so a (seed, element index) pair gives the same
// noise everywhere: the counter is the element index, the key is the seed, and the float
// conversion uses only exact integer->float steps (no FMA, no transcendental functions).
#pragma once
#include <cstdint>

#include "host_device.h"

namespace soniq::philox {

SONIQ_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t& hi) {
  const uint64_t p = uint64_t(a) * uint64_t(b);
  hi = uint32_t(p >> 32);
  return uint32_t(p);
}

// Returns the 4 output words of Philox4x32-10 for counter (c0..c3) and key (k0, k1).
SONIQ_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo(0xD2511F53u, c[0], hi0);
    const uint32_t lo1 = mulhilo(0xCD9E8D57u, c[2], hi1);
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// The 4 words of block `block` (elements 4*block .. 4*block+3) under `seed`.
SONIQ_HD void block_words(uint64_t seed, uint64_t block, uint32_t c[4]) {
  c[0] = uint32_t(block); c[1] = uint32_t(block >> 32); c[2] = 0u; c[3] = 0u;
  philox4x32_10(c, uint32_t(seed), uint32_t(seed >> 32));
}

// 32 random bits for element `index` under `seed`: block index/4, word index%4.
SONIQ_HD uint32_t bits_at(uint64_t seed, uint64_t index) {
  uint32_t c[4];
  block_words(seed, index >> 2, c);
  const unsigned i = unsigned(index & 3);  // selects, not c[i]: a dynamic index puts c in GPU local memory
  return i == 0 ? c[0] : i == 1 ? c[1] : i == 2 ? c[2] : c[3];
}

// u in [0, 1): the top 24 bits times 2^-24, exact in float and double.
SONIQ_HD float to_uniform(uint32_t w) { return float(w >> 8) * (1.0f / 16777216.0f); }

SONIQ_HD float uniform_f32(uint64_t seed, uint64_t index) { return to_uniform(bits_at(seed, index)); }

}  // namespace soniq::philox
