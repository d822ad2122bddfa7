#pragma once
// Block Hadamard rotation of one activation row (python/soniq/_hadamard.py): per block of
// `block` columns (a power of two >= 2 dividing k), the unnormalized Walsh-Hadamard transform
// (Sylvester order) of x. log2(block) butterfly
// stages, h = 1, 2, 4, ...: stage h pairs column i with i + h in groups of 2h and writes a + b
// to i and a - b to i + h. Every ISA version runs these float operations on every element in
// this order (no FMA, no reassociation), so all give the bits of the torch version.
#include <cstdint>

namespace soniq {

using HadamardRowFn = void (*)(const float* x, int64_t k, int block, float* out);

// A block these kernels take for rows of k: a power of two >= 2 dividing k.
bool hadamard_block_fits(int64_t block, int64_t k);

// The portable loop: the reference every ISA version is tested against.
void hadamard_row_ref(const float* x, int64_t k, int block, float* out);

}  // namespace soniq
