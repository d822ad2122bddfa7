// ISA-free parts shared by the layout GEMM kernels (kernels_avx2_layout.cpp,
// kernels_avx512_layout.cpp, kernels_amx.inl): the K block the int32 lanes hold, the 64-column
// block's epilogue setup and the per-thread decode buffer. Included inside each file's own
// namespace (no include guard: each including file gets its own copy, in an anonymous
// namespace, so no template instance is shared between objects built with different flags).
// A kernel template's instance for the run-time bit width `bits` (1..8).
#ifndef SONIQ_LAYOUT_BY_BITS
#define SONIQ_LAYOUT_BY_BITS(fn, ...)          \
  switch (bits) {                              \
    case 1: return fn<1>(__VA_ARGS__);         \
    case 2: return fn<2>(__VA_ARGS__);         \
    case 3: return fn<3>(__VA_ARGS__);         \
    case 4: return fn<4>(__VA_ARGS__);         \
    case 5: return fn<5>(__VA_ARGS__);         \
    case 6: return fn<6>(__VA_ARGS__);         \
    case 7: return fn<7>(__VA_ARGS__);         \
    default: return fn<8>(__VA_ARGS__);        \
  }
#endif

#include "thread_buffer.inl"

namespace {

template <class F>
inline void for_groups(F&& f) {  // f(integral_constant<int, G>) for G = 0..7, unrolled
  f(std::integral_constant<int, 0>{}); f(std::integral_constant<int, 1>{});
  f(std::integral_constant<int, 2>{}); f(std::integral_constant<int, 3>{});
  f(std::integral_constant<int, 4>{}); f(std::integral_constant<int, 5>{});
  f(std::integral_constant<int, 6>{}); f(std::integral_constant<int, 7>{});
}

// layout_gemm's contract (kernels.h): an epilogue needs the code-sum terms and a K the int32
// lanes hold in one block
inline void check_layout_epilogue(const LayoutEpilogue* ep, const int64_t* rowterm, int64_t kw) {
  if (ep && (!rowterm || kw * 64 > kLayoutEpilogueMaxK))
    throw std::invalid_argument("layout_gemm: an epilogue needs the code-sum terms and K <= kLayoutEpilogueMaxK");
}

// int32 lanes stay exact for this many chunks of 32 codes: at most 32768 products of
// 255 * 128 each (|sum| < 2^30)
constexpr int64_t kMaxChunksInt32 = 1024;

// The exact float epilogue of a strip (LayoutEpilogue, bit for bit the driver's): the int32
// lanes and the code-sum terms meet in double, exactly (integers below 2^53, so any order of
// the additions gives double(total)), then the driver's multiplications in its order. The
// micro-kernel leaves its accumulators in a small int32 tile first, so the epilogue's options
// are template flags, tested once per strip.
struct ColBlock {
  alignas(64) double colterm[64];  // double(colterm[j]) of the block's columns (0 past nc)
  alignas(64) double b_row[64];    // double(b_row[j]) (when the epilogue has b_row)
  alignas(64) int32_t colterm32[64];  // int32(colterm[j]) (0 past nc): accumulators' start
  bool contiguous;  // the block's output columns are ocol[0] + j (uniform tiers, or merging)
};

// The epilogue of the 64-column block at tile t0: ep's column arrays moved on to the block,
// and its column terms (ct: colterm at the block) and B row scales in cb as doubles.
inline LayoutEpilogue block_epilogue(const LayoutEpilogue& ep, int64_t t0, const int64_t* ct, int64_t nc,
                                     ColBlock& cb) {
  LayoutEpilogue e = ep;
  e.ocol += t0 * 16, e.run += t0 * 2;
  if (e.b_row) e.b_row += t0 * 16;
  if (e.bias) e.bias += t0 * 16;
  for (int64_t j = 0; j < 64; ++j) {
    cb.colterm[j] = j < nc ? double(ct[j]) : 0.0;
    cb.colterm32[j] = j < nc ? int32_t(ct[j]) : 0;
    cb.b_row[j] = e.b_row && j < nc ? double(e.b_row[j]) : 0.0;
  }
  cb.contiguous = true;
  for (int64_t j = 1; j < nc; ++j) cb.contiguous &= e.ocol[j] == e.ocol[0] + j;
  return e;
}

// The calling thread's decode buffer (slot 0).
inline int8_t* decode_buffer(int64_t bytes) { return thread_buffer<0>(bytes); }

}  // namespace
