// Shared by the AVX-512 layout kernels (kernels_avx512_layout.cpp) and the AMX ones
// (kernels_amx.inl): the execution layout's decode to VNNI operands, the int64 store of int32
// lanes, the exact float epilogue of a strip and the per-thread decode buffer. Included inside
// each file's own namespace, in translation units built with the AVX-512 flags only.
// (No include guard: each including file gets its own copy, in an anonymous namespace.)
namespace {

// One group (4 K codes x 16 columns) of a chunk of bits*64 bytes, as the vpdpbusd s8 operand.
// A part of width W at bit position P of the code, starting at vector V: one load, one
// 16-bit shift (bits never cross a byte after the mask) and one and.
template <int W, int P, int V, int G>
inline __m512i part(const int8_t* ch) {
  constexpr int per = 8 / W, sp = (G % per) * W;
  const __m512i x = _mm512_loadu_si512(ch + (V + G / per) * 64);
  __m512i y = x;
  if constexpr (P > sp) y = _mm512_slli_epi16(x, unsigned(P - sp));
  if constexpr (P < sp) y = _mm512_srli_epi16(x, unsigned(sp - P));
  return _mm512_and_si512(y, _mm512_set1_epi8(char(((1 << W) - 1) << P)));
}

template <int BITS, int G>
inline __m512i decode(const int8_t* ch) {
  if constexpr (BITS == 8) return _mm512_loadu_si512(ch + G * 64);
  else if constexpr (BITS == 1 || BITS == 2 || BITS == 4) return part<BITS, 0, 0, G>(ch);
  else if constexpr (BITS == 3) return _mm512_or_si512(part<2, 0, 0, G>(ch), part<1, 2, 2, G>(ch));
  else if constexpr (BITS == 5) return _mm512_or_si512(part<4, 0, 0, G>(ch), part<1, 4, 4, G>(ch));
  else if constexpr (BITS == 6) return _mm512_or_si512(part<4, 0, 0, G>(ch), part<2, 4, 4, G>(ch));
  else return _mm512_or_si512(_mm512_or_si512(part<4, 0, 0, G>(ch), part<2, 4, 4, G>(ch)), part<1, 6, 6, G>(ch));
}

template <class F>
inline void for_groups(F&& f) {  // f(integral_constant<int, G>) for G = 0..7, unrolled
  f(std::integral_constant<int, 0>{}); f(std::integral_constant<int, 1>{});
  f(std::integral_constant<int, 2>{}); f(std::integral_constant<int, 3>{});
  f(std::integral_constant<int, 4>{}); f(std::integral_constant<int, 5>{});
  f(std::integral_constant<int, 6>{}); f(std::integral_constant<int, 7>{});
}

// Where the int32 lanes go: C row (int64), its columns' count, and the base the first K
// block adds to (rowterm[i] + colterm[j] when set, else C itself).
struct Out {
  int64_t* c;
  int64_t nc;
  int shift;
  const int64_t* col;  // colterm at this row's first column, or null
  int64_t row;         // rowterm[i]
};

__attribute__((always_inline)) inline Out out_at(int64_t* C, int64_t ldc, int64_t i, int64_t j0, int64_t nc, int shift, const int64_t* rowterm,
                  const int64_t* colterm, bool first) {
  const bool base = first && rowterm;
  return Out{C + i * ldc + j0, nc - j0, shift, base ? colterm + j0 : nullptr, base ? rowterm[i] : 0};
}

// o.c[0..nc) = base + (the 16 int32 lanes of acc << shift) (column = lane), as int64
__attribute__((always_inline)) inline void add_lanes(__m512i acc, const Out& o) {
  for (int h = 0; h < 2; ++h) {
    const int64_t j = h * 8;
    if (j >= o.nc) return;
    const __mmask8 m = o.nc - j >= 8 ? __mmask8(0xFF) : __mmask8((1u << (o.nc - j)) - 1u);
    const __m256i part = h ? _mm512_extracti64x4_epi64(acc, 1) : _mm512_castsi512_si256(acc);
    const __m512i base = o.col ? _mm512_add_epi64(_mm512_maskz_loadu_epi64(m, o.col + j), _mm512_set1_epi64(o.row))
                               : _mm512_maskz_loadu_epi64(m, o.c + j);
    _mm512_mask_storeu_epi64(o.c + j, m, _mm512_add_epi64(base, _mm512_slli_epi64(_mm512_cvtepi32_epi64(part), unsigned(o.shift))));
  }
}

// int32 lanes stay exact for this many chunks: 8 vpdpbusd of at most 4 * 255 * 128 each per chunk
constexpr int64_t kMaxChunksInt32 = 1024;

// The float epilogue of a strip (LayoutEpilogue, bit for bit the driver's): the int32 lanes
// and the code-sum terms meet in double, exactly (integers below 2^53, so any order of the
// additions gives double(total)), then the driver's multiplications in its order. The
// micro-kernel leaves its accumulators in a small int32 tile first: run inline with 24 live
// accumulators the epilogue spilled its pointers and re-tested its options at every store
// (a fifth of a K = 384 layer's time); here the options are template flags, once per strip.
struct ColBlock {
  alignas(64) double colterm[64];  // double(colterm[j]) of the block's columns
  alignas(64) double b_row[64];    // double(b_row[j]) (when the epilogue has b_row)
};

template <bool AR, bool BR, bool BIAS>
void store_strip_f32(const int32_t* tile, int rows, const LayoutEpilogue& ep, const int64_t* rowterm,
                     const ColBlock& cb, int64_t nc, int shift) {
  const __m512d seg = _mm512_set1_pd(ep.segscale), scale = _mm512_set1_pd(double(int64_t(1) << shift));
  for (int i = 0; i < rows; ++i) {
    const int64_t o = ep.arow[i];
    float* out = ep.out + o * ep.ldo;
    const __m512d row = _mm512_set1_pd(double(rowterm[i]));
    const __m512d ar = _mm512_set1_pd(AR ? double(ep.a_row[o]) : 1.0);
    for (int64_t j = 0; j < nc; j += 8) {
      const __mmask8 m = nc - j >= 8 ? __mmask8(0xFF) : __mmask8((1u << (nc - j)) - 1u);
      __m512d p = _mm512_cvtepi32_pd(_mm256_load_si256(reinterpret_cast<const __m256i*>(tile + i * 64 + j)));
      if (shift) p = _mm512_mul_pd(p, scale);
      const __m512d t = _mm512_add_pd(p, _mm512_add_pd(row, _mm512_load_pd(cb.colterm + j)));
      // 0.0 + t * segscale, rounded once as the driver's mul then add (t != 0 is an integer, so
      // the product never underflows to a signed zero the add would turn to +0)
      __m512d v = _mm512_fmadd_pd(t, seg, _mm512_setzero_pd());
      if constexpr (AR) v = _mm512_mul_pd(v, ar);
      if constexpr (BR) v = _mm512_mul_pd(v, _mm512_load_pd(cb.b_row + j));
      __m256 f = _mm512_cvtpd_ps(v);
      if constexpr (BIAS) f = _mm256_add_ps(f, _mm256_maskz_loadu_ps(m, ep.bias + j));
      if (ep.run[j / 8]) {
        _mm256_mask_storeu_ps(out + ep.ocol[j], m, f);
      } else {  // scattered columns: scalar stores (vscatterqps is microcoded on Zen 4)
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, f);
        for (int64_t q = 0; q < 8 && j + q < nc; ++q) out[ep.ocol[j + q]] = tmp[q];
      }
    }
  }
}

void store_strip(const int32_t* tile, int rows, const LayoutEpilogue& ep, const int64_t* rowterm, const ColBlock& cb,
                 int64_t nc, int shift) {
  const int k = (ep.a_row ? 4 : 0) | (ep.b_row ? 2 : 0) | (ep.bias ? 1 : 0);
  switch (k) {
    case 0: return store_strip_f32<false, false, false>(tile, rows, ep, rowterm, cb, nc, shift);
    case 1: return store_strip_f32<false, false, true>(tile, rows, ep, rowterm, cb, nc, shift);
    case 2: return store_strip_f32<false, true, false>(tile, rows, ep, rowterm, cb, nc, shift);
    case 3: return store_strip_f32<false, true, true>(tile, rows, ep, rowterm, cb, nc, shift);
    case 4: return store_strip_f32<true, false, false>(tile, rows, ep, rowterm, cb, nc, shift);
    case 5: return store_strip_f32<true, false, true>(tile, rows, ep, rowterm, cb, nc, shift);
    case 6: return store_strip_f32<true, true, false>(tile, rows, ep, rowterm, cb, nc, shift);
    default: return store_strip_f32<true, true, true>(tile, rows, ep, rowterm, cb, nc, shift);
  }
}

// The block's column terms as doubles (zero past nc: those lanes are never stored).
inline void fill_col_block(ColBlock& cb, const int64_t* colterm, const float* b_row, int64_t nc) {
  for (int64_t j = 0; j < 64; j += 8) {
    const __mmask8 m = nc - j >= 8 ? __mmask8(0xFF) : nc > j ? __mmask8((1u << (nc - j)) - 1u) : __mmask8(0);
    _mm512_store_pd(cb.colterm + j, _mm512_cvtepi64_pd(_mm512_maskz_loadu_epi64(m, colterm + j)));
    if (b_row) _mm512_store_pd(cb.b_row + j, _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, b_row + j)));
  }
}

struct AlignedFree {
  void operator()(int8_t* p) const { std::free(p); }
};

// The epilogue of the 64-column block at tile t0: ep's column arrays moved on to the block,
// and its column terms (ct: colterm at the block) and B row scales in cb as doubles.
inline LayoutEpilogue block_epilogue(const LayoutEpilogue& ep, int64_t t0, const int64_t* ct, int64_t nc,
                                     ColBlock& cb) {
  LayoutEpilogue e = ep;
  e.ocol += t0 * 16, e.run += t0 * 2;
  if (e.b_row) e.b_row += t0 * 16;
  if (e.bias) e.bias += t0 * 16;
  fill_col_block(cb, ct, e.b_row, nc);
  return e;
}

// A per-thread buffer of at least `bytes` (64-byte aligned, kept for the next call); one per
// Slot. Its types are local to this file (no shared template instances with baseline code).
template <int Slot>
int8_t* thread_buffer(int64_t bytes) {
  thread_local std::unique_ptr<int8_t, AlignedFree> buf;  // dynamic: no large static TLS in a dlopen'ed module
  thread_local int64_t have = 0;
  if (have < bytes) {
    buf.reset(static_cast<int8_t*>(std::aligned_alloc(64, size_t((bytes + 63) / 64 * 64))));
    if (!buf) throw std::bad_alloc();
    have = bytes;
  }
  return buf.get();
}

// The calling thread's decode buffer (slot 0).
inline int8_t* decode_buffer(int64_t bytes) { return thread_buffer<0>(bytes); }

// Decodes tiles [t0, t0 + nt) of a 64-column block, chunks [c0, c0 + ncb) of each, into buf as
// plain VNNI operands [tile][group][64 bytes] (ts bytes per tile); tiles nt..3 are zeroed. A
// group's 64 bytes are 16 columns x 4 K codes: one vpdpbusd operand, one row of an AMX B tile.
template <int BITS>
void decode_block(const int8_t* L, int64_t tb, int64_t t0, int64_t nt, int64_t c0, int64_t ncb, int8_t* buf,
                  int64_t ts) {
  for (int64_t t = 0; t < 4; ++t) {
    int8_t* dst = buf + t * ts;
    if (t >= nt) {
      std::memset(dst, 0, size_t(ncb * 512));
      continue;
    }
    for (int64_t c = 0; c < ncb; ++c) {
      const int8_t* ch = L + (t0 + t) * tb + (c0 + c) * BITS * 64;
      for_groups([&](auto gc) {
        constexpr int G = decltype(gc)::value;
        _mm512_store_si512(dst + (c * 8 + G) * 64, decode<BITS, G>(ch));
      });
    }
  }
}

}  // namespace
