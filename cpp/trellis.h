#pragma once
// Viterbi search of soniq's bitshift trellis (python/soniq/_trellis.py, whose torch loop is the
// reference): 2^L states, `bits` bits per step, state s_t = ((s_{t-1} << bits) | b_t) mod 2^L,
// weight value values[s_t]; a path starts from zero history (s_0 < 2^bits). The width may change
// from step to step (bits_t: the row widths of a column coded as one path). One step reads the
// path costs `cost` [2^L], viewed as [2^bits][H] (H = 2^(L - bits)): the predecessors of the
// states j * 2^bits + b (b < 2^bits) are the column j of that view. It writes
//   m[j]    = min over h of cost[h * H + j]   (back[j] = the first h that gives it)
//   next[s] = m[s >> bits] + w (x - values[s])^2   (float32: a subtract, two multiplies, an add;
//                                                   w = 1 gives the unweighted sum's bits)
// Every ISA version runs these float operations in this order, with no contraction, and breaks
// ties towards the smaller h, so all give the bits (and the paths) of the torch reference.
#include <cstdint>

namespace soniq {

// m: scratch of at least H + 16 floats (the vector versions read past H)
using TrellisStepFn = void (*)(const float* cost, float* next, uint8_t* back, float* m, const float* values, float x,
                               float w, int states_log2, int bits);

// The portable loop: the reference every ISA version is tested against.
void trellis_step_ref(const float* cost, float* next, uint8_t* back, float* m, const float* values, float x,
                      float w, int states_log2, int bits);
#if defined(SONIQ_HAVE_X86_ISAS)
void trellis_step_avx2(const float* cost, float* next, uint8_t* back, float* m, const float* values, float x,
                       float w, int states_log2, int bits);
void trellis_step_avx512(const float* cost, float* next, uint8_t* back, float* m, const float* values, float x,
                         float w, int states_log2, int bits);
#endif

// x [R, T] (row-major float32): R independent sequences; bits [T]: the width of each step
// (shared by the R sequences); w [T]: each step's weight in the squared error (nullptr: 1);
// values [2^L]. Writes the states [R, T] of each sequence's least-squares path (ties: the
// smallest state at the end, the smallest h at each step), the sequences spread over the kernel
// threads. L <= 16, 1 <= bits[t] <= min(8, L), T >= 1; step: the ISA's step function.
void trellis_viterbi(const float* x, int64_t R, int64_t T, int states_log2, const uint8_t* bits, const float* w,
                     const float* values, int64_t* states, TrellisStepFn step);

}  // namespace soniq
