// Execution layout of a packed weight operand (issue #13): the operand's bit planes
// rearranged once, per (row group, K segment) block, into the order the CPU dot-product
// kernels read ("VNNI 4x16"), so no kernel regroups weights per call.
//
// A block of `bits` bits, `rows` rows and kw words of K is cut into tiles of 16 rows
// (the last one zero-padded) and, along K, into chunks of 32 codes = 8 groups g of 4
// codes. A chunk of one tile takes bits * 64 bytes: byte j*4 + kk of "the VNNI operand of
// group g" is the code of row j at k = chunk*32 + g*4 + kk. Codes are stored densely as
// split parts of width 4, 2, 1 (3 = 2+1, 5 = 4+1, 6 = 4+2, 7 = 4+2+1; one part of 1, 2 or
// 4 bits otherwise): a part of width w takes w vectors of 64 bytes; vector g / (8/w) holds
// group g's w bits at bit (g % (8/w)) * w of each byte, so one 64-byte load plus a shift
// and an and give a group's bits (parts after the first go to bit 4, 2+... above). 8-bit
// codes u are stored as the int8 u - 128 (one vector per group), so every group is a
// vpdpbusd s8 operand; kernels return sum a * (u - 128) there and the driver adds back
// 128 * (the A row's code sum). Resident bytes: bits/8 per code of the padded block.
// The layout is ISA-independent (the scalar reference reads it too) and built here, in
// baseline code.
#pragma once
#include <cstdint>
#include <vector>

#include "mpgemm.h"

namespace soniq {

constexpr int64_t kLayoutTile = 16;   // rows (output columns) per tile
constexpr int64_t kLayoutChunk = 32;  // K codes per chunk
// A b-bit code is stored as split parts of these widths (low part first; 0 ends the list):
// 3 = 2+1, 5 = 4+1, 6 = 4+2, 7 = 4+2+1, so every part packs whole codes into a byte.
constexpr int kLayoutPartWidths[9][3] = {{0}, {1}, {2}, {2, 1}, {4}, {4, 1}, {4, 2}, {4, 2, 1}, {8}};

// Bytes of one tile of a block (all its chunks): kw words = 2*kw chunks of bits*64 bytes.
inline int64_t layout_tile_bytes(int bits, int64_t kw) { return 2 * kw * int64_t(bits) * 64; }

// Byte offset of every (group, segment) block in (group, segment) order, plus the total
// at the end (size ngroups * nsegs + 1).
std::vector<int64_t> layout_offsets(const int64_t* desc, int64_t ngroups, const int64_t* ksegs, int64_t nsegs);

// Builds the layout of b (its planes) into out (layout_offsets(...).back() bytes).
void layout_build(const PackedOperand& b, const int64_t* ksegs, int64_t nsegs, int8_t* out);

// The inverse: b's bit planes rebuilt from a layout (data: the operand's word count).
void layout_to_planes(const int8_t* layout, const int64_t* desc, int64_t ngroups, const int64_t* ksegs,
                      int64_t nsegs, uint64_t* data);

}  // namespace soniq
