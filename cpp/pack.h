// Packing unsigned codes into bit planes and back (one uniform-precision block).
#pragma once
#include <cstdint>

namespace soniq {

// codes: [rows][ld] uint8, values < 2^bits; out: [bits][rows][kw] words, kw*64 >= klen.
void pack_block(const uint8_t* codes, int64_t rows, int64_t klen, int64_t ld, int bits, int64_t kw,
                uint64_t* out);
// planes: [bits][rows][kw]; out: [rows][ld] uint8 codes for the first klen columns.
void unpack_block(const uint64_t* planes, int64_t rows, int64_t klen, int bits, int64_t kw,
                  uint8_t* out, int64_t ld);

}  // namespace soniq
