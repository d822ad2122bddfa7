#include "mpgemm.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "dispatch.h"
#include "threadpool.h"
#include "wlayout.h"

namespace soniq {
namespace {

// A task is one (kTileM x kTileN) output tile over all K segments. 128 A rows amortize the
// byte path's per-tile expansion of B (~20 vector ops per 32 codes of a 4-bit row);
// GEMV (M=1) still gets N/64 tasks.
constexpr int64_t kTileM = 128;
constexpr int64_t kTileN = 64;
// With layout kernels B is decoded once per task (64 columns, all of K): 128 rows amortize it,
// and the float epilogue runs in the kernel's store (no int64 totals to keep in L1). Where
// the kernel writes the float outputs, large M takes up to kTileMLayoutMax rows per task while
// that leaves 4 tasks per thread: the decode (and a task's start) spread over more rows
// (2048^3: 2-3% faster at 512 rows).
constexpr int64_t kTileMLayout = kTileM;
constexpr int64_t kTileMLayoutMax = 512;
// Where tiers interleave in the output (WeightPrep::scattered) the kernels write rows in packed
// column order and a merge puts them in order. An output of at most kMergeSlabBytes is written
// in packed order in place and merged back a few rows at a time through a per-thread buffer
// of about kMergeCopyBytes (in L1): a second buffer the size of the output would add that much
// to the call's working set, which inside a model comes from L3 (MiniLM batch 1-4, AMX:
// 0.92-0.96x the forward's time). A larger output is written a row tile at a time to a buffer
// of the tile's rows owned by the thread running it, reused by its next tile (in L2), and
// merged from it into the output as one stream (batch 32: in place, the kernels' stores of
// 256-byte row pieces going to memory made the forward 1.06-1.07x slower; one buffer of a
// slab of rows for all threads, in L3, 1.02-1.05x). Column tasks (one thread, or too few rows
// per thread) write a slab of rows at a time to the calling thread's buffer of
// kMergeSlabBytes and merge it in a pass of its own.
constexpr int64_t kMergeSlabBytes = 4 << 20;
constexpr int64_t kMergeCopyBytes = 12 << 10;
// Fewest rows of a merging row tile: each tile decodes every column block of B again (in the
// shadow of its first strip). M = 128, 2 threads, MiniLM's mixed-tier layers: 64 rows 6-12%
// faster than 128-row tasks and a merge pass; 32 rows slower than 64 (B decoded 4 times).
constexpr int64_t kMergeTileMinRows = 64;

std::atomic<int> g_path_policy{0};

enum class BlockKernel { Bitserial, LayoutGemv, LayoutGemm };
bool is_layout(BlockKernel k) { return k != BlockKernel::Bitserial; }

// The one place that picks a block pair's kernel: from the ISA's table (its kernels and
// measured thresholds), the pair's bits, the A operand's rows (GEMV or not) and the rows of
// the tile, and the forced path if any.
// A weight kept as its layout only (no planes) runs every pair on the layout kernels.
BlockKernel select_block_kernel(const KernelTable& kt, int policy, bool b_planes, int ba, int bb, int64_t a_rows,
                                int64_t tile_rows) {
  const bool bytes = !b_planes                           ? true
                     : policy == int(KernelPath::Bitserial) ? false
                     : policy == int(KernelPath::Bytes)
                         ? true
                         : ba * bb > (a_rows <= 2 ? kt.bitserial_max_pairs_gemv : kt.bitserial_max_pairs);
  if (!bytes) return BlockKernel::Bitserial;
  return tile_rows <= kt.layout_gemv_rows ? BlockKernel::LayoutGemv : BlockKernel::LayoutGemm;
}

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

void check_operand(const PackedOperand& op, int64_t nsegs, const char* name, bool need_data = true) {
  if ((need_data && !op.data) || !op.desc || !op.sums || !op.perm || op.rows <= 0 || op.ngroups <= 0)
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


namespace {

WeightPrep prepare_checked(const PackedOperand& b, int64_t nsegs, const float* b_row, const float* bias) {
  WeightPrep p;
  const int64_t N = b.rows;
  if (b_row) p.b_row.resize(size_t(N));
  if (bias) p.bias.resize(size_t(N));
  for (int64_t j = 0; j < N; ++j) {
    if (b_row) p.b_row[size_t(j)] = b_row[b.perm[j]];
    if (bias) p.bias[size_t(j)] = bias[b.perm[j]];
  }
  p.runs.resize(size_t(b.ngroups));
  for (int64_t gb = 0; gb < b.ngroups; ++gb) {
    const int64_t r0 = b.desc[gb * (2 + nsegs)], rows = b.desc[gb * (2 + nsegs) + 1];
    auto& run = p.runs[size_t(gb)];
    for (int64_t j = 0; j < rows; j += 8) {
      bool ok = true;
      for (int64_t q = 1; q < 8 && j + q < rows; ++q) ok &= b.perm[r0 + j + q] == b.perm[r0 + j] + q;
      run.push_back(ok);
      p.scattered |= !ok;
    }
  }
  p.scattered &= N < (int64_t(1) << 31);  // (the merge indexes columns as int32)
  if (p.scattered) {  // the column merge (ColumnMerge)
    p.merge_inv.resize(size_t(N));
    bool ascending = true;
    for (int64_t gb = 0; gb < b.ngroups; ++gb) {
      const int64_t r0 = b.desc[gb * (2 + nsegs)], rows = b.desc[gb * (2 + nsegs) + 1];
      p.merge_start.push_back(r0);
      for (int64_t j = 1; j < rows; ++j) ascending &= b.perm[r0 + j] > b.perm[r0 + j - 1];
    }
    for (int64_t j = 0; j < N; ++j) p.merge_inv[size_t(b.perm[j])] = int32_t(j);
    if (ascending) {
      const int64_t G = b.ngroups;
      p.merge_masks.assign(size_t((N + 15) / 16 * G), 0);
      for (int64_t gb = 0; gb < G; ++gb) {
        const int64_t r0 = b.desc[gb * (2 + nsegs)], rows = b.desc[gb * (2 + nsegs) + 1];
        for (int64_t j = r0; j < r0 + rows; ++j) {
          const int64_t c = b.perm[j];
          p.merge_masks[size_t(c / 16 * G + gb)] |= uint16_t(1u << (c % 16));
        }
      }
      if (G == 2) {
        p.merge_lanes2.assign(size_t((N + 15) / 16 * 16), 0);
        for (int64_t q = 0; q * 16 < N; ++q) {
          int rank[2] = {0, 0};
          for (int64_t c = q * 16; c < std::min(N, q * 16 + 16); ++c) {
            const int g = p.merge_masks[size_t(q * 2)] >> (c % 16) & 1 ? 0 : 1;
            p.merge_lanes2[size_t(c)] = uint8_t(16 * g + rank[g]++);
          }
        }
      }
    }
  }
  return p;
}

}  // namespace

WeightPrep mpgemm_prepare(const PackedOperand& b, int64_t nsegs, const float* b_row, const float* bias) {
  check_operand(b, nsegs, "b", false);
  return prepare_checked(b, nsegs, b_row, bias);
}

namespace {

// Rows per task (see kTileMLayoutMax): the tasks of all group pairs at a tile of m rows.
int64_t layout_tile_m(const PackedOperand& a, const PackedOperand& b, int64_t nsegs, bool kernel_ep) {
  auto tasks_at = [&](int64_t m) {
    int64_t n = 0;
    for (int64_t ga = 0; ga < a.ngroups; ++ga)
      for (int64_t gb = 0; gb < b.ngroups; ++gb) {
        const int64_t ra = a.desc[ga * (2 + nsegs) + 1], rb = b.desc[gb * (2 + nsegs) + 1];
        n += (ra + m - 1) / m * ((rb + kTileN - 1) / kTileN);
      }
    return n;
  };
  int64_t m = kTileMLayout;
  if (!kernel_ep) return m;
  const int64_t want = 4 * int64_t(get_num_threads());
  while (2 * m <= kTileMLayoutMax && tasks_at(2 * m) >= want) m *= 2;
  return m;
}

}  // namespace

void mpgemm(const PackedOperand& a, const PackedOperand& b, const int64_t* ksegs, int64_t nsegs,
            const Scales& sc, OutKind kind, void* out, const int8_t* b_layout, const MpgemmExtras& ex) {
  if (nsegs <= 0 || !ksegs) throw std::invalid_argument("ksegs: at least one K segment is required");
  for (int64_t s = 0; s < nsegs; ++s)
    if (ksegs[2 * s] <= 0 || ksegs[2 * s + 1] * 64 < ksegs[2 * s])
      throw std::invalid_argument("ksegs: each segment needs klen > 0 and kw*64 >= klen");
  if (ex.a_bytes && (b.data || kind != OutKind::Float32))
    throw std::invalid_argument("a_bytes: needs a weight without planes and a float32 output");
  if (ex.bias && kind != OutKind::Float32) throw std::invalid_argument("bias: needs a float32 output");
  if (ex.gelu && kind != OutKind::Float32) throw std::invalid_argument("gelu: needs a float32 output");
  check_operand(a, nsegs, "a", !ex.a_bytes);
  if (!ex.b_prep) check_operand(b, nsegs, "b", false);
  const Layout la = block_offsets(a, ksegs, nsegs), lb = block_offsets(b, ksegs, nsegs);
  const KernelTable& kt = active_kernels();
  const int64_t N = b.rows;
  const int policy = g_path_policy.load(std::memory_order_relaxed);
  auto kernel_of = [&](int ba, int bb, int64_t tile_rows) {
    return select_block_kernel(kt, policy, b.data != nullptr, ba, bb, a.rows, tile_rows);
  };
  // which A blocks some block pair runs on the layout kernels with (the rest: bit-serial)
  if (!kt.layout_gemm) throw std::logic_error("kernel table without layout kernels");  // every table has them
  if (!b.data && !b_layout) throw std::invalid_argument("b: no bit planes and no execution layout");
  std::vector<char> on_layout(size_t(a.ngroups * nsegs), 0);
  bool any_layout = false;
  for (int64_t ga = 0; ga < a.ngroups; ++ga)
    for (int64_t s = 0; s < nsegs; ++s) {
      const int ba = int(a.desc[ga * (2 + nsegs) + 2 + s]);
      for (int64_t gb = 0; gb < b.ngroups && !on_layout[size_t(ga * nsegs + s)]; ++gb)
        on_layout[size_t(ga * nsegs + s)] = kernel_of(ba, int(b.desc[gb * (2 + nsegs) + 2 + s]), 1) != BlockKernel::Bitserial;
      any_layout |= bool(on_layout[size_t(ga * nsegs + s)]);
    }
  // the weight execution layout: the caller's, or one built for this call (none when every
  // block pair runs bit-serially: the planes are all it reads)
  std::vector<int64_t> lofs;
  std::vector<int8_t> own_layout;
  if (any_layout) {
    lofs = layout_offsets(b.desc, b.ngroups, ksegs, nsegs);
    if (!b_layout) {
      own_layout.resize(size_t(lofs.back()));
      layout_build(b, ksegs, nsegs, own_layout.data());
      b_layout = own_layout.data();
    }
  }

  // A blocks that some block pair runs on a byte kernel are expanded once per call to one
  // byte per code (rows padded with zero codes to kw*64), shared by all tasks.
  std::vector<std::vector<uint8_t>> abytes(size_t(a.ngroups * nsegs));
  for (int64_t ga = 0; ga < a.ngroups; ++ga) {
    const int64_t* da = a.desc + ga * (2 + nsegs);
    for (int64_t s = 0; s < nsegs; ++s) {
      if (!on_layout[size_t(ga * nsegs + s)] || ex.a_bytes) continue;  // a_bytes: already bytes
      const int64_t kw = ksegs[2 * s + 1], rows = da[1];
      auto& buf = abytes[size_t(ga * nsegs + s)];
      buf.resize(size_t(rows * kw * 64));
      const uint64_t* src = a.data + la.at(ga, s);
      // chunks of at least 64 rows and 16K codes: a pool round trip costs more than a small expansion
      const int64_t chunk = std::max<int64_t>(64, 256 / kw), nchunks = (rows + chunk - 1) / chunk;
      auto unpack_chunk = [&](int64_t c) {
        const int64_t r0 = c * chunk, nr = std::min(chunk, rows - r0);
        kt.unpack_planes(src + r0 * kw, int(da[2 + s]), rows * kw, nr, kw, buf.data() + r0 * kw * 64, kw * 64);
      };
      if (nchunks == 1) unpack_chunk(0);
      else parallel_for(nchunks, unpack_chunk);
    }
  }

  // Float output of one K segment: layout_gemm applies the epilogue at its store. It reads the
  // weight row scales and the bias in packed column order (WeightPrep).
  const bool kernel_ep = kind == OutKind::Float32 && nsegs == 1 &&
                         ksegs[1] * 64 <= kLayoutEpilogueMaxK;
  WeightPrep own_prep;
  const WeightPrep* prep = ex.b_prep;
  if (kernel_ep && !prep) own_prep = prepare_checked(b, nsegs, sc.b_row, ex.bias), prep = &own_prep;

  // Tiers interleaved in the output (prep->scattered): the kernels write rows in packed
  // column order to a buffer, merged into the output per slab of rows (ColumnMerge). Needs
  // the A rows in their own order (one A group, identity permutation).
  bool merge = kernel_ep && prep->scattered && a.ngroups == 1;
  for (int64_t i = 0; merge && i < a.rows; ++i) merge = a.perm[i] == i;
  const int64_t M = a.rows;
  const bool in_place = merge && M * N <= kMergeSlabBytes / 4;
  const int64_t lds = in_place ? N : N + 16;  // buffer rows: 16 readable floats past each (the merge's reads)

  struct Task { int64_t ga, gb, m0, m1, n0, n1; };
  // Merging on more than one thread, with at least kMergeTileMinRows rows per thread: a unit of
  // work is one row tile across every column (all tiers), then the merge of its rows, read back
  // from the L2 of the core that wrote them (a merge pass after all tasks read half of them from
  // the other cores' caches, and waited for the slowest task). Row tiles are halved down to
  // kMergeTileMinRows while a slab holds fewer than two per thread, and a slab holds a whole
  // number of tiles per thread (no thread idles at a slab's end; the buffer may then pass
  // kMergeSlabBytes, never the output's size). Fewer rows (GEMV, M = 16): column tasks, then
  // a merge pass.
  int64_t tile_m = layout_tile_m(a, b, nsegs, kernel_ep);
  const int64_t threads = get_num_threads();
  const int64_t slab_rows = std::max<int64_t>(1, kMergeSlabBytes / (lds * 4)), slab_fill = std::min(M, slab_rows);
  const bool units = merge && threads > 1 && slab_fill >= threads * kMergeTileMinRows;
  if (units)
    while (tile_m / 2 >= kMergeTileMinRows && (slab_fill + tile_m - 1) / tile_m < 2 * threads) tile_m /= 2;
  const int64_t round = units ? tile_m * threads : tile_m;
  // a slab: rows whose merge buffer stays within kMergeSlabBytes (at least `round` rows)
  const int64_t slab = merge ? std::max(round, slab_rows / round * round) : std::max<int64_t>(M, 1);
  std::vector<Task> tasks;
  std::vector<int64_t> slab_end;  // tasks [slab_end[s - 1], slab_end[s]) cover slab s
  for (int64_t s0 = 0; s0 < std::max<int64_t>(M, 1); s0 += slab) {
    const auto first = int64_t(tasks.size());
    for (int64_t ga = 0; ga < a.ngroups; ++ga) {
      const int64_t* da = a.desc + ga * (2 + nsegs);
      const int64_t r0 = std::max<int64_t>(0, s0 - da[0]), r1 = std::min(da[1], s0 + slab - da[0]);
      // units: by row tile (see tile_m), every B group's columns in each; else by B group
      const int64_t span = units ? tile_m : r1 - r0;
      for (int64_t u0 = r0; u0 < r1; u0 += span)
        for (int64_t gb = 0; gb < b.ngroups; ++gb) {
          const int64_t* db = b.desc + gb * (2 + nsegs);
          for (int64_t m0 = u0; m0 < std::min(r1, u0 + span); m0 += tile_m)
            for (int64_t n0 = 0; n0 < db[1]; n0 += kTileN)
              tasks.push_back({ga, gb, m0, std::min(r1, m0 + tile_m), n0, std::min(db[1], n0 + kTileN)});
        }
    }
    // else (tasks of unequal size: a tier's tail of 1-3 column tiles) each thread takes a
    // contiguous run of about equal work, largest first (balanced_runs, padded with empty
    // tasks). Dealt round-robin instead, a 128 x 1536 x 384 layer with tiers of 1229 and 307
    // output channels ran 1.3x the time it takes with tiers of 1280 and 256 (AMX, 2 threads).
    auto tiles = [](const Task& x) { return (x.m1 - x.m0) * ((x.n1 - x.n0 + 15) / 16); };
    const auto n = int64_t(tasks.size()) - first;
    bool equal = true;
    for (int64_t i = first + 1; equal && i < int64_t(tasks.size()); ++i)
      equal = tiles(tasks[size_t(i)]) == tiles(tasks[size_t(first)]);
    if (!units && !equal && threads > 1 && n > 1) {
      std::vector<int64_t> work(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) work[size_t(i)] = tiles(tasks[size_t(first + i)]);
      std::vector<Task> ordered;
      for (const int64_t i : balanced_runs(work, threads))
        ordered.push_back(i < 0 ? Task{0, 0, 0, 0, 0, 0} : tasks[size_t(first + i)]);
      tasks.resize(size_t(first));
      tasks.insert(tasks.end(), ordered.begin(), ordered.end());
    }
    slab_end.push_back(int64_t(tasks.size()));
  }
  // the calling thread's, kept for its next call: the merge buffer (a large output), and for
  // the kernels' stores in packed order the identity column map and all-consecutive runs
  thread_local std::vector<float> merge_buf;
  thread_local std::vector<int64_t> iota;
  thread_local std::vector<uint8_t> all_runs;
  if (merge) {
    if (!in_place && !units) merge_buf.resize(size_t(std::min(slab, M) * lds));
    for (int64_t j = int64_t(iota.size()); j < N; ++j) iota.push_back(j);
    if (int64_t(all_runs.size()) < (N + 7) / 8) all_runs.assign(size_t((N + 7) / 8), 1);
  }
  // (pointers: in the tasks, on other threads, the names would be those threads' own)
  const int64_t* const iota_cols = iota.data();
  const uint8_t* const runs_all = all_runs.data();

  // merging: the kernels write row m in packed column order at pk + m * lds
  auto run_task = [&](int64_t t, float* pk) {
    const Task& T = tasks[size_t(t)];
    if (T.m1 == T.m0) return;  // padding (balanced_runs)
    const int64_t* da = a.desc + T.ga * (2 + nsegs);
    const int64_t* db = b.desc + T.gb * (2 + nsegs);
    const int64_t tm = T.m1 - T.m0, tn = T.n1 - T.n0;
    thread_local std::vector<int64_t> block_buf, itotal_buf, rowterm_buf, colterm_buf;
    thread_local std::vector<double> ftotal_buf;
    block_buf.resize(size_t(tile_m * kTileN));
    itotal_buf.resize(size_t(tile_m * kTileN));
    ftotal_buf.resize(size_t(tile_m * kTileN));
    rowterm_buf.resize(size_t(tile_m));
    colterm_buf.resize(size_t(kTileN));
    // One K segment (the usual case) needs no float accumulator: its scaled value is formed
    // once, at the end; integer totals start from the code-sum corrections of all segments
    // and the layout kernels add their products straight into them.
    const bool float_acc = kind == OutKind::Float32 && nsegs > 1;
    int64_t* block = block_buf.data();
    int64_t* itotal = itotal_buf.data();
    double* ftotal = ftotal_buf.data();
    int64_t* rowterm = rowterm_buf.data();
    int64_t* colterm = colterm_buf.data();
    if (float_acc) std::fill(ftotal, ftotal + tm * kTileN, 0.0);
    // sum_k (aa*ua + oa)(ab*ub + ob) = aa*ab*sum ua*ub + aa*ob*sum ua + ab*oa*sum ub + klen*oa*ob;
    // layout kernels give sum ua*(ub - 128) for 8-bit ub: 128 * aa*ab * sum ua is added back.
    auto terms = [&](int64_t s, bool add) {  // rowterm/colterm of segment s (added to them when add)
      const int ba = int(da[2 + s]), bb = int(db[2 + s]);
      const CodeEncoding ea = code_encoding(ba, a.is_signed), eb = code_encoding(bb, b.is_signed);
      const int64_t aa = ea.alpha, oa = ea.offset, ab = eb.alpha, ob = eb.offset;
      const int64_t flip = is_layout(kernel_of(ba, bb, tm)) && bb == 8 ? 128 : 0;
      const int64_t klen = ksegs[2 * s];
      // locals: through the captured references GCC reloaded them per column (colterm may alias)
      const int64_t ns = nsegs, cf = ab * oa, *bs = b.sums + (db[0] + T.n0) * ns + s;
      for (int64_t j = 0; j < tn; ++j) colterm[j] = (add ? colterm[j] : 0) + cf * bs[j * ns];
      for (int64_t i = 0; i < tm; ++i) {
        const int64_t asum = a.sums[(da[0] + T.m0 + i) * nsegs + s];
        rowterm[i] = (add ? rowterm[i] : 0) + aa * ob * asum + klen * oa * ob + aa * ab * flip * asum;
      }
    };
    // the first segment's layout kernel writes the totals from the terms (no separate pass)
    const bool fuse_terms = !float_acc && is_layout(kernel_of(int(da[2]), int(db[2]), tm));
    if (!float_acc) {
      for (int64_t s = 0; s < nsegs; ++s) terms(s, s > 0);
      if (!fuse_terms)
        for (int64_t i = 0; i < tm; ++i)
          for (int64_t j = 0; j < tn; ++j) itotal[i * kTileN + j] = rowterm[i] + colterm[j];
    }
    double segscale = 1.0;
    bool written = false;  // the kernel wrote the float outputs (its epilogue)
    for (int64_t s = 0; s < nsegs; ++s) {
      const int64_t kw = ksegs[2 * s + 1];
      const int ba = int(da[2 + s]), bb = int(db[2 + s]);
      const int64_t aab = code_encoding(ba, a.is_signed).alpha * code_encoding(bb, b.is_signed).alpha;  // 1, 2 or 4
      const int shift = aab == 4 ? 2 : int(aab >> 1);
      segscale = double(sc.a_seg ? sc.a_seg[s] : 1.0f) * double(sc.b_seg ? sc.b_seg[s] : 1.0f);
      const uint64_t* B = b.data + lb.at(T.gb, s) + T.n0 * kw;
      const BlockKernel bk = kernel_of(ba, bb, tm);
      const uint8_t* Abytes = bk == BlockKernel::Bitserial ? nullptr
                              : (ex.a_bytes ? ex.a_bytes[T.ga * nsegs + s] : abytes[size_t(T.ga * nsegs + s)].data()) +
                                    T.m0 * kw * 64;
      if (is_layout(bk)) {
        const int8_t* L = b_layout + lofs[size_t(T.gb * nsegs + s)] + (T.n0 / kLayoutTile) * layout_tile_bytes(bb, kw);
        const LayoutGemmFn fn = bk == BlockKernel::LayoutGemv ? kt.layout_gemv : kt.layout_gemm;
        if (kernel_ep && bk == BlockKernel::LayoutGemm) {  // the float outputs, written by the kernel
          const int64_t c0 = db[0] + T.n0;
          // merging: rows in packed column order (the merge puts them in order)
          const LayoutEpilogue ep{merge ? pk : static_cast<float*>(out), merge ? lds : N,
                                  a.perm + da[0] + T.m0, (merge ? iota_cols : b.perm) + c0,
                                  (merge ? runs_all : prep->runs[size_t(T.gb)].data()) + T.n0 / 8,
                                  segscale, sc.a_row, sc.b_row ? prep->b_row.data() + c0 : nullptr,
                                  ex.bias ? prep->bias.data() + c0 : nullptr};
          fn(Abytes, kw * 64, tm, L, bb, tn, kw, nullptr, kTileN, shift, rowterm, colterm, &ep);
          written = true;
          continue;
        }
        if (!float_acc) {  // products added (<< shift) straight into the totals
          const bool init = fuse_terms && s == 0;
          fn(Abytes, kw * 64, tm, L, bb, tn, kw, itotal, kTileN, shift, init ? rowterm : nullptr, colterm, nullptr);
          continue;
        }
        for (int64_t i = 0; i < tm; ++i) std::fill(block + i * kTileN, block + i * kTileN + tn, int64_t(0));
        fn(Abytes, kw * 64, tm, L, bb, tn, kw, block, kTileN, 0, nullptr, nullptr, nullptr);
      } else {
        const uint64_t* A = a.data + la.at(T.ga, s) + T.m0 * kw;
        if (!float_acc) {  // products added (<< shift) straight into the totals
          kt.bitserial(A, ba, da[1] * kw, tm, B, bb, db[1] * kw, tn, kw, itotal, kTileN, shift);
          continue;
        }
        for (int64_t i = 0; i < tm; ++i) std::fill(block + i * kTileN, block + i * kTileN + tn, int64_t(0));
        kt.bitserial(A, ba, da[1] * kw, tm, B, bb, db[1] * kw, tn, kw, block, kTileN, 0);
      }
      // several K segments, float output: each segment's scaled value summed in double
      terms(s, false);
      for (int64_t i = 0; i < tm; ++i) {
        const int64_t* blk = block + i * kTileN;
        double* ft = ftotal + i * kTileN;
        for (int64_t j = 0; j < tn; ++j) ft[j] += double(aab * blk[j] + rowterm[i] + colterm[j]) * segscale;
      }
    }
    if (written) return;
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
        // merging: a task the kernel epilogue did not take (few rows) writes packed order too
        float* o = merge ? pk + m * lds + db[0] + T.n0 : static_cast<float*>(out) + m * N;
        const double ar = sc.a_row ? double(sc.a_row[m]) : 1.0;
        if (!merge && !float_acc && kt.epilogue_f32) {
          kt.epilogue_f32(itotal + i * kTileN, tn, segscale, sc.a_row != nullptr, ar, sc.b_row, bperm, o, ex.bias);
          continue;
        }
        for (int64_t j = 0; j < tn; ++j) {
          const int64_t n = bperm[j];
          // one segment: (0.0 + v * segscale) is v * segscale exactly, as the accumulated form
          double v = float_acc ? ftotal[i * kTileN + j] : 0.0 + double(itotal[i * kTileN + j]) * segscale;
          if (sc.a_row) v *= ar;
          if (sc.b_row) v *= double(sc.b_row[n]);
          o[merge ? j : n] = ex.bias ? float(v) + ex.bias[n] : float(v);  // float32 add, as torch's out + bias
        }
      }
    }
  };

  // the activation on output rows [r0, r1), once final (ex.gelu)
  const GeluRowFn gelu = !ex.gelu ? nullptr : kt.gelu_row ? kt.gelu_row : gelu_row_ref;
  auto activate = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; gelu && r < r1; ++r) gelu(static_cast<float*>(out) + r * N, N);
  };
  const ColumnMerge cm = merge ? prep->column_merge() : ColumnMerge{};
  // output rows [r0, r1), written in packed column order (row m at pk + m * lds), merged into
  // the original order (in place: a few rows at a time copied to a buffer in L1, as the merge
  // reads 16 floats past each row), then activated
  auto finish_rows = [&](int64_t r0, int64_t r1, const float* pk) {
    if (!merge) return activate(r0, r1);
    if (!in_place) {
      kt.merge_columns(pk + r0 * lds, lds, r1 - r0, cm, static_cast<float*>(out) + r0 * N, N);
      return activate(r0, r1);
    }
    thread_local std::vector<float> rows_buf;
    const int64_t ldt = N + 16, per = std::max<int64_t>(1, kMergeCopyBytes / (ldt * 4));
    if (rows_buf.size() < size_t(per * ldt)) rows_buf.resize(size_t(per * ldt));
    float* const o = static_cast<float*>(out);
    for (int64_t r = r0; r < r1; r += per) {
      const int64_t nr = std::min(per, r1 - r);
      for (int64_t i = 0; i < nr; ++i) std::memcpy(rows_buf.data() + i * ldt, o + (r + i) * N, size_t(N) * 4);
      kt.merge_columns(rows_buf.data(), ldt, nr, cm, o + r * N, N);
      activate(r, r + nr);
    }
  };
  std::vector<int64_t> unit_end;  // merging: tasks [unit_end[u - 1], unit_end[u]) share a row tile
  for (size_t sl = 0; sl < slab_end.size(); ++sl) {
    const int64_t t0 = sl ? slab_end[sl - 1] : 0, nt = slab_end[sl] - t0;
    const int64_t slab0 = int64_t(sl) * slab;
    // in place, or the slab buffer of column tasks (a row tile's thread has its own: below)
    float* const pk = in_place ? static_cast<float*>(out) : merge && !units ? merge_buf.data() - slab0 * lds : nullptr;
    if (!units) {
      parallel_for(nt, [&](int64_t t) { run_task(t0 + t, pk); });
      if (!merge && !gelu) continue;
      const int64_t rows = std::min(slab, M - slab0), per = 8, nchunks = (rows + per - 1) / per;
      auto merge_rows = [&](int64_t c) {
        const int64_t r0 = slab0 + c * per;
        finish_rows(r0, std::min(r0 + per, slab0 + rows), pk);
      };
      if (nchunks == 1) merge_rows(0);
      else parallel_for(nchunks, merge_rows);
      continue;
    }
    unit_end.clear();
    for (int64_t t = t0; t < t0 + nt; ++t)
      if (t + 1 == t0 + nt || tasks[size_t(t + 1)].m0 != tasks[size_t(t)].m0) unit_end.push_back(t + 1);
    parallel_for(int64_t(unit_end.size()), [&](int64_t u) {
      const int64_t u0 = u ? unit_end[size_t(u - 1)] : t0, u1 = unit_end[size_t(u)];
      const int64_t m0 = tasks[size_t(u0)].m0, m1 = tasks[size_t(u0)].m1;  // rows of A group 0: output rows
      float* upk = pk;
      if (!in_place) {  // this thread's buffer, reused by its next unit
        thread_local std::vector<float> unit_buf;
        if (unit_buf.size() < size_t(tile_m * lds)) unit_buf.resize(size_t(tile_m * lds));
        upk = unit_buf.data() - m0 * lds;
      }
      for (int64_t t = u0; t < u1; ++t) run_task(t, upk);
      finish_rows(m0, m1, upk);
    });
  }
}

void set_kernel_path(KernelPath p) { g_path_policy.store(int(p), std::memory_order_relaxed); }
KernelPath get_kernel_path() { return KernelPath(g_path_policy.load(std::memory_order_relaxed)); }

}  // namespace soniq
