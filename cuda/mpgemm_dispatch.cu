// Host side of the CUDA mpgemm: validates the host-side metadata (desc, ksegs), builds
// the by-value launch parameters and picks a kernel by shape and bit widths. Nothing
// here synchronizes or allocates, so a call can be captured in a CUDA graph.
#include <algorithm>
#include <atomic>
#include <climits>
#include <mutex>
#include <stdexcept>
#include <string>

#include "mpgemm_common.cuh"

namespace soniq::cuda {
namespace detail {

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so later calls start clean
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
  }
}

namespace {

void fill_operand(OperandLayout& L, const PackedOperand& op, const int64_t* ksegs, int64_t nsegs, const char* name) {
  auto bad = [name](const std::string& msg) { throw std::invalid_argument(std::string(name) + ": " + msg); };
  if (!op.data || !op.desc || !op.sums || !op.perm || op.rows <= 0 || op.ngroups <= 0)
    bad("empty or null packed operand");
  if (op.rows > INT_MAX) bad("more than 2**31-1 rows is not supported by the CUDA kernels");
  if (op.ngroups > kMaxGroups)
    bad("the CUDA kernels take at most " + std::to_string(kMaxGroups) + " row groups, got " +
        std::to_string(op.ngroups));
  L = OperandLayout{};
  L.data = op.data;
  L.sums = op.sums;
  L.perm = op.perm;
  L.rows = int(op.rows);
  L.ngroups = int(op.ngroups);
  L.is_signed = op.is_signed ? 1 : 0;
  long long covered = 0, off = 0;
  for (int64_t g = 0; g < op.ngroups; ++g) {
    const int64_t* d = op.desc + g * (2 + nsegs);  // host memory
    if (d[0] != covered || d[1] <= 0) bad("row groups must tile the rows in order");
    L.row_start[g] = int(d[0]);
    L.row_count[g] = int(d[1]);
    L.max_group_rows = std::max(L.max_group_rows, int(d[1]));
    covered += d[1];
    for (int64_t s = 0; s < nsegs; ++s) {
      if (d[2 + s] < 1 || d[2 + s] > 8) bad("block bits must be in 1..8");
      L.bits[g][s] = int(d[2 + s]);
      L.max_bits = std::max(L.max_bits, int(d[2 + s]));
      L.offset[g][s] = off;
      off += d[2 + s] * d[1] * ksegs[2 * s + 1];
    }
  }
  if (covered != op.rows) bad("row groups do not cover all rows");
}

}  // namespace

GemmParams make_params(const PackedOperand& a, const PackedOperand& b, const int64_t* ksegs, int64_t nsegs,
                       const Scales& sc, OutKind kind, void* out) {
  if (nsegs <= 0 || !ksegs) throw std::invalid_argument("ksegs: at least one K segment is required");
  if (nsegs > kMaxSegs)
    throw std::invalid_argument("ksegs: the CUDA kernels take at most " + std::to_string(kMaxSegs) +
                                " K segments, got " + std::to_string(nsegs));
  if (!out) throw std::invalid_argument("out: null output pointer");
  GemmParams P{};
  P.nsegs = int(nsegs);
  for (int64_t s = 0; s < nsegs; ++s) {
    if (ksegs[2 * s] <= 0 || ksegs[2 * s + 1] * 64 < ksegs[2 * s])
      throw std::invalid_argument("ksegs: each segment needs klen > 0 and kw*64 >= klen");
    P.klen[s] = ksegs[2 * s];
    P.kw[s] = ksegs[2 * s + 1];
  }
  fill_operand(P.a, a, ksegs, nsegs, "a");
  fill_operand(P.b, b, ksegs, nsegs, "b");
  P.sc = sc;
  P.out = out;
  P.kind = int(kind);
  return P;
}

long long schedule_tiles(GemmParams& P, int tile_m, int tile_n) {
  P.tile_m = tile_m;
  P.tile_n = tile_n;
  long long total = 0;
  int p = 0;
  for (int ga = 0; ga < P.a.ngroups; ++ga)
    for (int gb = 0; gb < P.b.ngroups; ++gb, ++p) {
      const long long tm = (P.a.row_count[ga] + tile_m - 1) / tile_m;
      const long long tn = (P.b.row_count[gb] + tile_n - 1) / tile_n;
      P.pair_ga[p] = (unsigned char)ga;
      P.pair_gb[p] = (unsigned char)gb;
      P.tiles_n[p] = int(tn);
      P.tile_start[p] = int(total);
      total += tm * tn;
      if (total > INT_MAX) throw std::invalid_argument("mpgemm: too many output tiles for one launch");
    }
  P.npairs = p;
  P.tile_start[p] = int(total);
  for (int q = p + 1; q <= kMaxPairs; ++q) P.tile_start[q] = INT_MAX;  // locate_tile never runs past
  return total;
}

void allow_smem(const void* kernel, int bytes) {
  if (bytes <= 48 * 1024) return;
  // Per (kernel, device); a handful of kernels and devices, so a small locked list.
  static std::mutex mu;
  static std::pair<const void*, int> done[64];
  static int ndone = 0;
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mu);
  for (int k = 0; k < ndone; ++k)
    if (done[k].first == kernel && done[k].second == dev) return;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 96 * 1024),
             "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  if (ndone < 64) done[ndone++] = {kernel, dev};
}

}  // namespace detail

namespace {

std::string& last_query_error() {
  static std::string s;
  return s;
}

std::atomic<int> forced_kernel{0};  // index into kKernelNames
const char* const kKernelNames[] = {"auto", "ref", "popc", "gemv", "mma", "bmma", "int8mm", "mma4"};

}  // namespace

int device_count() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    last_query_error() = cudaGetErrorString(e);
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::string runtime_error_text() { return last_query_error(); }

void set_kernel(const std::string& name) {
  for (int k = 0; k < int(sizeof(kKernelNames) / sizeof(kKernelNames[0])); ++k)
    if (name == kKernelNames[k]) {
      forced_kernel = k;
      return;
    }
  throw std::invalid_argument("kernel must be one of auto, ref, popc, gemv, mma, bmma, int8mm, mma4; got '" + name +
                              "'");
}

std::string get_kernel() { return kKernelNames[forced_kernel.load()]; }

namespace {

// INT4 tensor cores (mma.m16n8k64 u4) run at twice the INT8 rate on sm_80-89; sm_90 has
// none (the instruction is accepted, slower). Read per call: an attribute query, no sync.
bool has_int4_tensor_cores() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return major == 8;
}

std::string choose_kernel(const detail::GemmParams& P) {
  const int forced = forced_kernel.load();
  if (forced != 0) {
    if (forced == 3 && P.a.max_group_rows > detail::kGemvMaxRows)
      throw std::invalid_argument("kernel 'gemv' needs every row group of a to have at most 16 rows");
    return kKernelNames[forced];
  }
  // First guesses, to be settled by bench/gpu_gemm.py. Small M streams the weights
  // (memory bound, where low bits pay) while the popcount work per weight word, rows x
  // a bits x b bits, stays small (M=1 W4A8: 32; M=16 W2A8: 256 goes to the tensor cores).
  // Larger M: codes expanded to int8 once, then cuBLAS INT8 (exact while every segment
  // has klen <= 131071: |sum c_a c_b| <= klen * 2^14 < 2^31); else the mma kernel.
  int mb = 1;
  while (mb < P.a.max_group_rows) mb *= 2;
  if (P.a.max_group_rows <= detail::kGemvMaxRows && mb * P.a.max_bits * P.b.max_bits <= 64) return "gemv";
  bool short_k = true;
  for (int s = 0; s < P.nsegs; ++s) short_k = short_k && P.klen[s] <= 131071;
  if (P.a.max_group_rows > detail::kGemvMaxRows && short_k) return "int8mm";
  if (P.a.max_bits * P.b.max_bits <= 2) return "popc";
  return detail::all_int4_block_pairs(P) && has_int4_tensor_cores() ? "mma4" : "mma";
}

}  // namespace

std::string choose_kernel(const PackedOperand& a, const PackedOperand& b, const int64_t* ksegs, int64_t nsegs) {
  return choose_kernel(detail::make_params(a, b, ksegs, nsegs, Scales{}, OutKind::Int64, reinterpret_cast<void*>(1)));
}

void mpgemm(const PackedOperand& a, const PackedOperand& b, const int64_t* ksegs, int64_t nsegs,
            const Scales& scales, OutKind kind, void* out, void* stream) {
  detail::GemmParams P = detail::make_params(a, b, ksegs, nsegs, scales, kind, out);
  const std::string k = choose_kernel(P);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (k == "ref") detail::launch_ref(P, st);
  else if (k == "popc") detail::launch_popc(P, st);
  else if (k == "gemv") detail::launch_gemv(P, st);
  else if (k == "bmma") detail::launch_bmma(P, st);
  else detail::launch_mma(P, st, k == "mma4");  // "mma", "mma4", and "int8mm" when called from C++ directly
}

}  // namespace soniq::cuda
