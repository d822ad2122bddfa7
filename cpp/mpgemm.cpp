#include "mpgemm.h"

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <vector>

#include "dispatch.h"
#include "threadpool.h"

namespace soniq {
namespace {

// A task is one (kTileM x kTileN) output tile over all K segments. 128 A rows amortize the
// byte path's per-tile expansion of B (~20 vector ops per 32 codes of a 4-bit row);
// GEMV (M=1) still gets N/64 tasks.
constexpr int64_t kTileM = 128;
constexpr int64_t kTileN = 64;

std::atomic<int> g_path_policy{0};

struct Layout {  // word offset of every (group, segment) block
  std::vector<int64_t> offset;
  int64_t nsegs;
  int64_t at(int64_t g, int64_t s) const { return offset[g * nsegs + s]; }
};

Layout block_offsets(const PackedOperand& op, const int64_t* ksegs, int64_t nsegs) {
  Layout L{std::vector<int64_t>(size_t(op.ngroups * nsegs)), nsegs};
  int64_t off = 0;
  for (int64_t g = 0; g < op.ngroups; ++g) {
    const int64_t* d = op.desc + g * (2 + nsegs);
    for (int64_t s = 0; s < nsegs; ++s) {
      L.offset[g * nsegs + s] = off;
      off += d[2 + s] * d[1] * ksegs[2 * s + 1];
    }
  }
  return L;
}

void check_operand(const PackedOperand& op, int64_t nsegs, const char* name) {
  if (!op.data || !op.desc || !op.sums || !op.perm || op.rows <= 0 || op.ngroups <= 0)
    throw std::invalid_argument(std::string(name) + ": empty or null packed operand");
  int64_t covered = 0;
  for (int64_t g = 0; g < op.ngroups; ++g) {
    const int64_t* d = op.desc + g * (2 + nsegs);
    if (d[0] != covered || d[1] <= 0)
      throw std::invalid_argument(std::string(name) + ": row groups must tile the rows in order");
    covered += d[1];
    for (int64_t s = 0; s < nsegs; ++s)
      if (d[2 + s] < 1 || d[2 + s] > 8)
        throw std::invalid_argument(std::string(name) + ": block bits must be in 1..8");
  }
  if (covered != op.rows) throw std::invalid_argument(std::string(name) + ": row groups do not cover all rows");
  std::vector<bool> seen(size_t(op.rows), false);  // perm drives output writes: must be a permutation
  for (int64_t i = 0; i < op.rows; ++i) {
    const int64_t r = op.perm[i];
    if (r < 0 || r >= op.rows || seen[size_t(r)])
      throw std::invalid_argument(std::string(name) + ": row permutation is not a permutation");
    seen[size_t(r)] = true;
  }
}

}  // namespace

void mpgemm(const PackedOperand& a, const PackedOperand& b, const int64_t* ksegs, int64_t nsegs,
            const Scales& sc, OutKind kind, void* out) {
  if (nsegs <= 0 || !ksegs) throw std::invalid_argument("ksegs: at least one K segment is required");
  for (int64_t s = 0; s < nsegs; ++s)
    if (ksegs[2 * s] <= 0 || ksegs[2 * s + 1] * 64 < ksegs[2 * s])
      throw std::invalid_argument("ksegs: each segment needs klen > 0 and kw*64 >= klen");
  check_operand(a, nsegs, "a");
  check_operand(b, nsegs, "b");
  const Layout la = block_offsets(a, ksegs, nsegs), lb = block_offsets(b, ksegs, nsegs);
  const KernelTable& kt = active_kernels();
  const int64_t N = b.rows;
  const int policy = g_path_policy.load(std::memory_order_relaxed);
  auto use_bytes = [&](int ba, int bb) {
    if (policy == int(KernelPath::Bitserial)) return false;
    if (policy == int(KernelPath::Bytes) || policy == int(KernelPath::Lut)) return true;
    return ba * bb > (a.rows <= 2 ? kt.bitserial_max_pairs_gemv : kt.bitserial_max_pairs);
  };
  // byte-path blocks of GEMV rows use table lookup when the ISA has it
  const bool use_lut = kt.lut_planes && (policy == int(KernelPath::Lut) ||
                                         (policy == int(KernelPath::Auto) && a.rows <= 2));

  // A blocks that some block pair runs on the byte path are expanded once per call to one
  // byte per code (rows padded with zero codes to kw*64), shared by all tasks.
  std::vector<std::vector<uint8_t>> abytes(size_t(a.ngroups * nsegs)), luts(size_t(a.ngroups * nsegs));
  for (int64_t ga = 0; ga < a.ngroups; ++ga) {
    const int64_t* da = a.desc + ga * (2 + nsegs);
    for (int64_t s = 0; s < nsegs; ++s) {
      bool need = false;
      for (int64_t gb = 0; gb < b.ngroups; ++gb) need |= use_bytes(int(da[2 + s]), int(b.desc[gb * (2 + nsegs) + 2 + s]));
      if (!need) continue;
      const int64_t kw = ksegs[2 * s + 1], rows = da[1];
      auto& buf = abytes[size_t(ga * nsegs + s)];
      buf.resize(size_t(rows * kw * 64));
      if (use_lut) luts[size_t(ga * nsegs + s)].resize(size_t(rows * lut_bytes(kw)));
      const uint64_t* src = a.data + la.at(ga, s);
      // chunks of at least 64 rows and 16K codes: a pool round trip costs more than a small expansion
      const int64_t chunk = std::max<int64_t>(64, 256 / kw), nchunks = (rows + chunk - 1) / chunk;
      auto unpack_chunk = [&](int64_t c) {
        const int64_t r0 = c * chunk, nr = std::min(chunk, rows - r0);
        kt.unpack_planes(src + r0 * kw, int(da[2 + s]), rows * kw, nr, kw, buf.data() + r0 * kw * 64, kw * 64);
      };
      if (nchunks == 1) unpack_chunk(0);
      else parallel_for(nchunks, unpack_chunk);
      if (use_lut) {  // tables per row, built in pieces of 32 words (whole 4-word chunks) over threads
        constexpr int64_t kPiece = 32;
        const int64_t pieces = (kw + kPiece - 1) / kPiece;
        uint8_t* lut = luts[size_t(ga * nsegs + s)].data();
        parallel_for(rows * pieces, [&](int64_t t) {
          const int64_t r = t / pieces, w0 = (t % pieces) * kPiece, n = std::min(kPiece, kw - w0);
          kt.lut_build(buf.data() + r * kw * 64 + w0 * 64, n, lut + r * lut_bytes(kw) + w0 / 4 * 2048);
        });
      }
    }
  }

  struct Task { int64_t ga, gb, m0, m1, n0, n1; };
  std::vector<Task> tasks;
  for (int64_t ga = 0; ga < a.ngroups; ++ga) {
    const int64_t* da = a.desc + ga * (2 + nsegs);
    for (int64_t gb = 0; gb < b.ngroups; ++gb) {
      const int64_t* db = b.desc + gb * (2 + nsegs);
      for (int64_t m0 = 0; m0 < da[1]; m0 += kTileM)
        for (int64_t n0 = 0; n0 < db[1]; n0 += kTileN)
          tasks.push_back({ga, gb, m0, std::min(da[1], m0 + kTileM), n0, std::min(db[1], n0 + kTileN)});
    }
  }

  parallel_for(int64_t(tasks.size()), [&](int64_t t) {
    const Task& T = tasks[size_t(t)];
    const int64_t* da = a.desc + T.ga * (2 + nsegs);
    const int64_t* db = b.desc + T.gb * (2 + nsegs);
    const int64_t tm = T.m1 - T.m0, tn = T.n1 - T.n0;
    thread_local std::vector<int64_t> block_buf, itotal_buf;
    thread_local std::vector<double> ftotal_buf;
    block_buf.resize(size_t(kTileM * kTileN));
    itotal_buf.resize(size_t(kTileM * kTileN));
    ftotal_buf.resize(size_t(kTileM * kTileN));
    // zero only the rows this tile uses: a GEMV tile has 1 of 128. One K segment (the usual
    // case) needs no float accumulator: its scaled value is formed once, at the end.
    const bool float_acc = kind == OutKind::Float32 && nsegs > 1;
    std::fill(itotal_buf.begin(), itotal_buf.begin() + tm * kTileN, int64_t(0));
    if (float_acc) std::fill(ftotal_buf.begin(), ftotal_buf.begin() + tm * kTileN, 0.0);
    int64_t* block = block_buf.data();
    int64_t* itotal = itotal_buf.data();
    double* ftotal = ftotal_buf.data();
    thread_local std::vector<int64_t> colterm_buf;
    colterm_buf.resize(size_t(kTileN));
    int64_t* colterm = colterm_buf.data();
    double segscale = 1.0;
    for (int64_t s = 0; s < nsegs; ++s) {
      const int64_t klen = ksegs[2 * s], kw = ksegs[2 * s + 1];
      const int ba = int(da[2 + s]), bb = int(db[2 + s]);
      const uint64_t* B = b.data + lb.at(T.gb, s) + T.n0 * kw;
      if (use_bytes(ba, bb)) {
        if (use_lut) {
          const uint8_t* L = luts[size_t(T.ga * nsegs + s)].data() + T.m0 * lut_bytes(kw);
          kt.lut_planes(L, tm, B, bb, db[1] * kw, tn, kw, block, kTileN);
        } else {
          const uint8_t* A = abytes[size_t(T.ga * nsegs + s)].data() + T.m0 * kw * 64;
          kt.bytes_planes(A, kw * 64, tm, B, bb, db[1] * kw, tn, kw, block, kTileN);
        }
      } else {
        const uint64_t* A = a.data + la.at(T.ga, s) + T.m0 * kw;
        kt.bitserial(A, ba, da[1] * kw, tm, B, bb, db[1] * kw, tn, kw, block, kTileN);
      }
      // sum_k (aa*ua + oa)(ab*ub + ob) = aa*ab*sum ua*ub + aa*ob*sum ua + ab*oa*sum ub + klen*oa*ob
      int64_t aa, oa, ab, ob;
      code_affine(ba, a.is_signed, aa, oa);
      code_affine(bb, b.is_signed, ab, ob);
      const int64_t aab = aa * ab;
      for (int64_t j = 0; j < tn; ++j) colterm[j] = ab * oa * b.sums[(db[0] + T.n0 + j) * nsegs + s];
      segscale = double(sc.a_seg ? sc.a_seg[s] : 1.0f) * double(sc.b_seg ? sc.b_seg[s] : 1.0f);
      for (int64_t i = 0; i < tm; ++i) {
        const int64_t rowterm = aa * ob * a.sums[(da[0] + T.m0 + i) * nsegs + s] + klen * oa * ob;
        const int64_t* blk = block + i * kTileN;
        int64_t* it = itotal + i * kTileN;
        if (float_acc) {
          double* ft = ftotal + i * kTileN;
          for (int64_t j = 0; j < tn; ++j) ft[j] += double(aab * blk[j] + rowterm + colterm[j]) * segscale;
        } else if (aab == 1) {  // plain adds: vectorizable with baseline flags
          for (int64_t j = 0; j < tn; ++j) it[j] += blk[j] + rowterm + colterm[j];
        } else {
          for (int64_t j = 0; j < tn; ++j) it[j] += aab * blk[j] + rowterm + colterm[j];
        }
      }
    }
    for (int64_t i = 0; i < tm; ++i) {
      const int64_t m = a.perm[da[0] + T.m0 + i];
      const int64_t* bperm = b.perm + db[0] + T.n0;
      if (kind == OutKind::Int32) {
        int32_t* o = static_cast<int32_t*>(out) + m * N;
        for (int64_t j = 0; j < tn; ++j) o[bperm[j]] = int32_t(itotal[i * kTileN + j]);
      } else if (kind == OutKind::Int64) {
        int64_t* o = static_cast<int64_t*>(out) + m * N;
        for (int64_t j = 0; j < tn; ++j) o[bperm[j]] = itotal[i * kTileN + j];
      } else {
        float* o = static_cast<float*>(out) + m * N;
        const double ar = sc.a_row ? double(sc.a_row[m]) : 1.0;
        if (!float_acc && kt.epilogue_f32) {
          kt.epilogue_f32(itotal + i * kTileN, tn, segscale, sc.a_row != nullptr, ar, sc.b_row, bperm, o);
          continue;
        }
        for (int64_t j = 0; j < tn; ++j) {
          const int64_t n = bperm[j];
          // one segment: (0.0 + v * segscale) is v * segscale exactly, as the accumulated form
          double v = float_acc ? ftotal[i * kTileN + j] : 0.0 + double(itotal[i * kTileN + j]) * segscale;
          if (sc.a_row) v *= ar;
          if (sc.b_row) v *= double(sc.b_row[n]);
          o[n] = float(v);
        }
      }
    }
  });
}

void set_kernel_path(KernelPath p) { g_path_policy.store(int(p), std::memory_order_relaxed); }
KernelPath get_kernel_path() { return KernelPath(g_path_policy.load(std::memory_order_relaxed)); }

}  // namespace soniq
