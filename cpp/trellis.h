#pragma once
// Viterbi search of soniq's bitshift trellis (python/soniq/_trellis.py, whose torch loop is the
// reference): 2^L states, `bits` bits per step, state s_t = ((s_{t-1} << bits) | b_t) mod 2^L,
// weight value values[s_t]; a path starts from zero history (s_0 < 2^bits). One step reads the
// path costs `cost` [2^L], viewed as [2^bits][H] (H = 2^(L - bits)): the predecessors of the
// states j * 2^bits + b (b < 2^bits) are the column j of that view. It writes
//   m[j]    = min over h of cost[h * H + j]   (back[j] = the first h that gives it)
//   next[s] = m[s >> bits] + (x - values[s])^2    (float32: a subtract, a multiply, an add)
// Every ISA version runs these float operations in this order, with no contraction, and breaks
// ties towards the smaller h, so all give the bits (and the paths) of the torch reference.
#include <cstdint>

namespace soniq {

// m: scratch of at least H + 16 floats (the vector versions read past H)
using TrellisStepFn = void (*)(const float* cost, float* next, uint8_t* back, float* m, const float* values, float x,
                               int states_log2, int bits);

// The portable loop: the reference every ISA version is tested against.
void trellis_step_ref(const float* cost, float* next, uint8_t* back, float* m, const float* values, float x,
                      int states_log2, int bits);
#if defined(SONIQ_HAVE_X86_ISAS)
void trellis_step_avx2(const float* cost, float* next, uint8_t* back, float* m, const float* values, float x,
                       int states_log2, int bits);
void trellis_step_avx512(const float* cost, float* next, uint8_t* back, float* m, const float* values, float x,
                         int states_log2, int bits);
#endif

// x [R, T] (row-major float32): R independent sequences; values [2^L]. Writes the states
// [R, T] of each sequence's least-squares path (ties: the smallest state at the end, the
// smallest h at each step), the sequences spread over the kernel threads. L <= 16,
// 1 <= bits <= min(8, L), T >= 1; step: the ISA's step function.
void trellis_viterbi(const float* x, int64_t R, int64_t T, int states_log2, int bits, const float* values,
                     int64_t* states, TrellisStepFn step);

}  // namespace soniq
