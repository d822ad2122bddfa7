// The CUDA emulator behind tests/cuda_emu/include/cuda_runtime.h: blocks run one after
// another, the threads of a block are fibers switched cooperatively at barriers and warp
// collectives (makecontext/setcontext to start one, GCC's __builtin_setjmp/longjmp to
// switch: no signal-mask system call as in swapcontext, and no sanitizer stack unpoisoning
// as in an intercepted longjmp; both made a switch 10x dearer).
//
// Two knobs make synchronization bugs visible (the tests run several combinations):
//   SONIQ_EMU_ORDER=forward|reverse   order of the threads between synchronization points,
//     so a missing barrier shows whichever side of it the reader is on;
//   SONIQ_EMU_CP_ASYNC=late|eager     a cp.async lands at the issuing thread's wait_group
//     (late: catches reading staged data before waiting for it and the barrier after) or
//     at once (eager: catches overwriting a stage that other threads still read).
#include <cuda_runtime.h>
#include <ucontext.h>

#include <cstdlib>
#include <deque>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SONIQ_EMU_ASAN 1
#endif

namespace soniq_emu {
namespace {

constexpr std::size_t kStackBytes = 256 * 1024;
constexpr int kWarp = 32;
constexpr std::size_t kDefaultSmemLimit = 48 * 1024;  // without cudaFuncSetAttribute
constexpr std::size_t kMaxSmem = 227 * 1024;          // H100 opt-in maximum per block

struct Fault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Copy {
  void* dst;
  const void* src;
  int size, bytes;
};

enum class State { Ready, AtBarrier, AtWarp, Done };
enum class WarpOp { None, Shfl, Ballot, MmaU8, MmaU4, MmaB1 };

struct Fiber {
  ucontext_t ctx;  // the entry context (used once)
  void* jb[5];     // where the fiber resumes (__builtin_setjmp buffer)
  bool started = false;
  void* stack = nullptr;
  dim3 tid;
  State state = State::Ready;
  std::vector<Copy> open;                 // cp.async issued since the last commit
  std::deque<std::vector<Copy>> groups;   // committed, oldest first
  WarpOp op = WarpOp::None;
  unsigned long long in[10] = {};
  long long out[4] = {};
};

struct Block {
  std::vector<Fiber> fibers;
  unsigned char* smem = nullptr;
  std::size_t smem_bytes = 0;
  Body* body = nullptr;
};

void* g_sched_jb[5];
Block g_block;
Fiber* g_cur = nullptr;
dim3 g_block_idx, g_block_dim, g_grid_dim;
struct StackPool {  // fiber stacks, reused by every block; freed at exit
  std::vector<void*> stacks;
  ~StackPool() {
    for (void* p : stacks) std::free(p);
  }
} g_stacks;
std::string g_fault;                        // first fault of the running launch
cudaError_t g_last_error = cudaSuccess;
std::string g_last_message;
std::vector<std::pair<const void*, int>> g_smem_attr;
#if defined(SONIQ_EMU_ASAN)
const void* g_sched_stack = nullptr;
std::size_t g_sched_stack_size = 0;
#endif

bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v && std::string(v) == value;
}
bool reverse_order() { return env_is("SONIQ_EMU_ORDER", "reverse"); }
bool eager_copies() { return env_is("SONIQ_EMU_CP_ASYNC", "eager"); }

Fiber& cur() {
  if (!g_cur) throw std::logic_error("soniq_emu: device function called outside a kernel");
  return *g_cur;
}

// __builtin_longjmp may not share a function with its __builtin_setjmp. Not declared
// noreturn, and not instrumented: ASan would unpoison the whole stack before each jump.
__attribute__((noinline, no_sanitize_address)) void jump_to(void** buf) { __builtin_longjmp(buf, 1); }

[[noreturn]] void fiber_entry() {
  Fiber* f = g_cur;
#if defined(SONIQ_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &g_sched_stack, &g_sched_stack_size);
#endif
  try {
    g_block.body->run();
  } catch (const Fault& e) {
    if (g_fault.empty()) g_fault = e.what();
  } catch (const std::exception& e) {
    if (g_fault.empty()) g_fault = std::string("exception in a kernel: ") + e.what();
  }
  f->state = State::Done;
#if defined(SONIQ_EMU_ASAN)
  __sanitizer_start_switch_fiber(nullptr, g_sched_stack, g_sched_stack_size);  // this stack is done
#endif
  jump_to(g_sched_jb);
  __builtin_unreachable();
}

// The switch points themselves are not instrumented: ASan would unpoison the whole stack
// (and query sigaltstack) each time a __builtin_setjmp returns the second time.
__attribute__((no_sanitize_address)) void run_fiber(Fiber& f) {
  g_cur = &f;
#if defined(SONIQ_EMU_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
  if (__builtin_setjmp(g_sched_jb) == 0) {
    if (!f.started) {
      f.started = true;
      setcontext(&f.ctx);
    }
    jump_to(f.jb);
  }
#if defined(SONIQ_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  g_cur = nullptr;
}

__attribute__((no_sanitize_address)) void yield(State s) {
  Fiber& f = cur();
  f.state = s;
#if defined(SONIQ_EMU_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, g_sched_stack, g_sched_stack_size);
#endif
  if (__builtin_setjmp(f.jb) == 0) jump_to(g_sched_jb);
#if defined(SONIQ_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake, &g_sched_stack, &g_sched_stack_size);
#endif
  g_cur = &f;
  if (!g_fault.empty()) throw Fault("aborted: another thread of the launch faulted");
}

void complete(const Copy& c) {
  if (c.bytes > 0) std::memcpy(c.dst, c.src, std::size_t(c.bytes));
  std::memset(static_cast<unsigned char*>(c.dst) + c.bytes, 0, std::size_t(c.size - c.bytes));
}

// ---- warp collectives ------------------------------------------------------------------

// d0, d1: row g, cols 2t, 2t+1; d2, d3: row g+8. The s32 accumulator must not overflow
// (the kernels flush to 64 bits in time; the GPU would wrap silently).
void scatter_accumulators(Fiber* const* lanes, const long long (&C)[16][8]) {
  for (int i = 0; i < 16; ++i)
    for (int n = 0; n < 8; ++n)
      if (C[i][n] > 2147483647LL || C[i][n] < -2147483648LL) fault("mma.sync: the s32 accumulator overflowed");
  for (int l = 0; l < kWarp; ++l) {
    const int g = l / 4, t = l % 4;
    for (int e = 0; e < 4; ++e) lanes[l]->out[e] = C[g + (e >= 2 ? 8 : 0)][2 * t + (e & 1)];
  }
}

void perform_shfl(Fiber* const* lanes) {
  for (int l = 0; l < kWarp; ++l) {
    if (unsigned(lanes[l]->in[1]) != 0xffffffffu) fault("__shfl_xor_sync: only the full-warp mask is emulated");
    const int src = l ^ int(lanes[l]->in[2]);
    if (src < 0 || src >= kWarp) fault("__shfl_xor_sync: lane mask out of range");
    lanes[l]->out[0] = static_cast<long long>(lanes[src]->in[0]);
  }
}

void perform_ballot(Fiber* const* lanes) {
  unsigned bits = 0;
  for (int l = 0; l < kWarp; ++l) {
    if (unsigned(lanes[l]->in[0]) != 0xffffffffu) fault("__ballot_sync: only the full-warp mask is emulated");
    bits |= unsigned(lanes[l]->in[1] != 0) << l;
  }
  for (int l = 0; l < kWarp; ++l) lanes[l]->out[0] = bits;
}

// in[0..3] = a0..a3, in[4..5] = b0..b1, in[6..9] = c0..c3, laid out as the PTX ISA's
// "Matrix Fragments for mma.m16n8k32" (u8: 4 elements per register, low byte first),
// "... for mma.m16n8k64" (u4: 8 per register, low nibble first; EB = element bits) and
// "... for mma.m16n8k256" (b1: 32 elements per register, low bit first); see cuda/ptx.cuh.
unsigned long long g_mma_u4 = 0;

template <int EB>
void perform_mma_int(Fiber* const* lanes) {
  if (EB == 4) ++g_mma_u4;
  constexpr int per = 32 / EB, K = 8 * per;  // elements per register; K of the shape
  unsigned char A[16][K] = {}, B[K][8] = {};
  long long C[16][8] = {};
  auto elem = [](unsigned long long reg, int j) { return static_cast<unsigned char>((reg >> (EB * j)) & ((1u << EB) - 1)); };
  for (int l = 0; l < kWarp; ++l) {
    const int g = l / 4, t = l % 4;
    const unsigned long long* r = lanes[l]->in;
    for (int reg = 0; reg < 4; ++reg)  // a0: row g, a1: row g+8; a2, a3: the same rows, k + K/2
      for (int j = 0; j < per; ++j) A[g + (reg & 1) * 8][(reg >> 1) * (K / 2) + per * t + j] = elem(r[reg], j);
    for (int reg = 0; reg < 2; ++reg)
      for (int j = 0; j < per; ++j) B[reg * (K / 2) + per * t + j][g] = elem(r[4 + reg], j);
    for (int e = 0; e < 4; ++e) C[g + (e >= 2 ? 8 : 0)][2 * t + (e & 1)] = static_cast<int>(r[6 + e]);
  }
  for (int i = 0; i < 16; ++i)
    for (int n = 0; n < 8; ++n)
      for (int k = 0; k < K; ++k) C[i][n] += (long long)A[i][k] * B[k][n];
  scatter_accumulators(lanes, C);
}

void perform_mma_b1(Fiber* const* lanes) {
  // 32-bit words of K: word w holds k = 32w .. 32w+31, bit j = k 32w+j
  unsigned A[16][8] = {}, B[8][8] = {};  // A[row][word], B[col][word]
  long long C[16][8] = {};
  for (int l = 0; l < kWarp; ++l) {
    const int g = l / 4, t = l % 4;
    const unsigned long long* r = lanes[l]->in;
    for (int reg = 0; reg < 4; ++reg) A[g + (reg & 1) * 8][(reg >> 1) * 4 + t] = unsigned(r[reg]);
    for (int reg = 0; reg < 2; ++reg) B[g][reg * 4 + t] = unsigned(r[4 + reg]);
    for (int e = 0; e < 4; ++e) C[g + (e >= 2 ? 8 : 0)][2 * t + (e & 1)] = static_cast<int>(r[6 + e]);
  }
  for (int i = 0; i < 16; ++i)
    for (int n = 0; n < 8; ++n)
      for (int w = 0; w < 8; ++w) C[i][n] += __builtin_popcount(A[i][w] & B[n][w]);
  scatter_accumulators(lanes, C);
}

// Releases the warps whose every lane waits at the same collective; false if none.
bool release_warps() {
  bool released = false;
  const int n = int(g_block.fibers.size());
  for (int w0 = 0; w0 < n; w0 += kWarp) {
    const int end = std::min(n, w0 + kWarp);
    int waiting = 0, live = 0;
    for (int i = w0; i < end; ++i) {
      const State s = g_block.fibers[i].state;
      live += s != State::Done;
      waiting += s == State::AtWarp;
    }
    if (waiting == 0 || waiting != live) continue;
    if (waiting != kWarp)
      fault("warp collective (shuffle or mma.sync) with exited lanes or a partial warp: undefined on the GPU");
    Fiber* lanes[kWarp];
    for (int l = 0; l < kWarp; ++l) lanes[l] = &g_block.fibers[w0 + l];
    const WarpOp op = lanes[0]->op;
    for (int l = 1; l < kWarp; ++l)
      if (lanes[l]->op != op) fault("warp collective: lanes of one warp reached different collectives");
    if (op == WarpOp::Shfl) perform_shfl(lanes);
    else if (op == WarpOp::Ballot) perform_ballot(lanes);
    else if (op == WarpOp::MmaU8) perform_mma_int<8>(lanes);
    else if (op == WarpOp::MmaU4) perform_mma_int<4>(lanes);
    else perform_mma_b1(lanes);
    for (int l = 0; l < kWarp; ++l) lanes[l]->state = State::Ready, lanes[l]->op = WarpOp::None;
    released = true;
  }
  return released;
}

std::string describe_deadlock() {
  int bar = 0, warp = 0, done = 0;
  for (const Fiber& f : g_block.fibers) {
    bar += f.state == State::AtBarrier;
    warp += f.state == State::AtWarp;
    done += f.state == State::Done;
  }
  return "deadlock in block (" + std::to_string(g_block_idx.x) + "," + std::to_string(g_block_idx.y) + "): " +
         std::to_string(bar) + " threads at __syncthreads, " + std::to_string(warp) +
         " at a warp collective whose warp never converges, " + std::to_string(done) + " exited";
}

// Emulator bookkeeping, not instrumented (the kernels it runs are).
__attribute__((no_sanitize_address)) void run_block(std::size_t smem, Body& body) {
  const int n = int(g_block_dim.x * g_block_dim.y * g_block_dim.z);
  g_block.body = &body;
  g_block.smem_bytes = smem;
  g_block.smem = smem ? static_cast<unsigned char*>(std::malloc(smem)) : nullptr;
  if (g_block.smem) std::memset(g_block.smem, 0xA5, smem);  // shared memory starts as garbage
  g_block.fibers.assign(std::size_t(n), Fiber{});
  while (int(g_stacks.stacks.size()) < n) g_stacks.stacks.push_back(std::malloc(kStackBytes));
  for (int i = 0; i < n; ++i) {
    Fiber& f = g_block.fibers[i];
    f.tid = dim3(unsigned(i) % g_block_dim.x, (unsigned(i) / g_block_dim.x) % g_block_dim.y,
                 unsigned(i) / (g_block_dim.x * g_block_dim.y));
    f.stack = g_stacks.stacks[i];
#if defined(SONIQ_EMU_ASAN)
    ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes);  // a faulted fiber may have left redzones
#endif
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;  // fiber_entry never returns: it jumps back to the scheduler
    makecontext(&f.ctx, fiber_entry, 0);
  }
  const bool rev = reverse_order();
  for (;;) {
    int live = 0, at_bar = 0;
    for (int k = 0; k < n && g_fault.empty(); ++k) {
      Fiber& f = g_block.fibers[rev ? n - 1 - k : k];
      if (f.state == State::Ready) run_fiber(f);
      live += f.state != State::Done;
      at_bar += f.state == State::AtBarrier;
    }
    if (!g_fault.empty() || live == 0) break;
    try {
      if (at_bar == live) {
        for (Fiber& f : g_block.fibers)
          if (f.state == State::AtBarrier) f.state = State::Ready;
      } else if (!release_warps()) {
        fault(describe_deadlock().c_str());
      }
    } catch (const Fault& e) {
      g_fault = e.what();
      break;
    }
  }
  // Abandoned fibers (after a fault) are simply dropped: kernel frames hold no resources.
  std::free(g_block.smem);
  g_block.smem = nullptr;
  g_block.fibers.clear();
}

bool valid_dims(dim3 grid, dim3 block) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  return grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u && grid.y <= 65535 &&
         grid.z <= 65535 && threads >= 1 && threads <= 1024 && block.z <= 64;
}

cudaError_t fail(cudaError_t e, const std::string& why) {
  g_last_error = e;
  g_last_message = why;  // reported by cudaGetErrorString, as the CUDA error text
  return e;
}

}  // namespace

const dim3& thread_idx() { return cur().tid; }
const dim3& block_idx() { return g_block_idx; }
const dim3& block_dim() { return g_block_dim; }
const dim3& grid_dim() { return g_grid_dim; }

void fault(const char* what) { throw Fault(what); }

void syncthreads() { yield(State::AtBarrier); }

void* dynamic_smem() { return g_block.smem; }

void check_global_load(const void* p, std::size_t align) {
  if (reinterpret_cast<std::uintptr_t>(p) % align != 0)
    fault(("misaligned " + std::to_string(align) + "-byte global load").c_str());
}

void cp_async(void* dst, const void* src, int size, int bytes) {
  if (bytes < 0 || bytes > size) fault("cp.async: src-size must be in 0..cp-size");
  if (reinterpret_cast<std::uintptr_t>(dst) % unsigned(size) || reinterpret_cast<std::uintptr_t>(src) % unsigned(size))
    fault("cp.async: shared and global addresses must be aligned to the copy size");
  const auto* d = static_cast<const unsigned char*>(dst);
  if (!g_block.smem || d < g_block.smem || d + size > g_block.smem + g_block.smem_bytes)
    fault("cp.async: destination outside the block's dynamic shared memory");
  if (eager_copies()) complete(Copy{dst, src, size, bytes});
  else cur().open.push_back(Copy{dst, src, size, bytes});
}

void cp_async_commit() {
  Fiber& f = cur();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

void cp_async_wait(int n) {
  Fiber& f = cur();
  while (int(f.groups.size()) > n) {
    for (const Copy& c : f.groups.front()) complete(c);
    f.groups.pop_front();
  }
}

namespace {
void warp_collective(WarpOp op, std::initializer_list<unsigned long long> in) {
  Fiber& f = cur();
  f.op = op;
  int i = 0;
  for (unsigned long long v : in) f.in[i++] = v;
  yield(State::AtWarp);
}
}  // namespace

unsigned long long shfl_xor(unsigned mask, unsigned long long bits, int lane_mask) {
  warp_collective(WarpOp::Shfl, {bits, mask, static_cast<unsigned long long>(lane_mask)});
  return static_cast<unsigned long long>(cur().out[0]);
}

unsigned ballot(unsigned mask, bool predicate) {
  warp_collective(WarpOp::Ballot, {mask, predicate ? 1ull : 0ull});
  return static_cast<unsigned>(cur().out[0]);
}

void mma_m16n8k32_u8(int (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
  warp_collective(WarpOp::MmaU8, {a0, a1, a2, a3, b0, b1, static_cast<unsigned>(c[0]), static_cast<unsigned>(c[1]),
                                  static_cast<unsigned>(c[2]), static_cast<unsigned>(c[3])});
  for (int e = 0; e < 4; ++e) c[e] = static_cast<int>(cur().out[e]);
}

unsigned long long mma_u4_count() { return g_mma_u4; }

void mma_m16n8k64_u4(int (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
  warp_collective(WarpOp::MmaU4, {a0, a1, a2, a3, b0, b1, static_cast<unsigned>(c[0]), static_cast<unsigned>(c[1]),
                                  static_cast<unsigned>(c[2]), static_cast<unsigned>(c[3])});
  for (int e = 0; e < 4; ++e) c[e] = static_cast<int>(cur().out[e]);
}

void mma_m16n8k256_b1_and_popc(int (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                               unsigned b1) {
  warp_collective(WarpOp::MmaB1, {a0, a1, a2, a3, b0, b1, static_cast<unsigned>(d[0]), static_cast<unsigned>(d[1]),
                                  static_cast<unsigned>(d[2]), static_cast<unsigned>(d[3])});
  for (int e = 0; e < 4; ++e) d[e] = static_cast<int>(cur().out[e]);
}

cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, std::size_t smem, Body& body) {
  if (g_cur) return fail(cudaErrorInvalidValue, "kernel launched from inside a kernel");
  if (!valid_dims(grid, block)) return fail(cudaErrorInvalidConfiguration, "invalid grid or block dimensions");
  std::size_t limit = kDefaultSmemLimit;
  for (const auto& a : g_smem_attr)
    if (a.first == kernel) limit = std::size_t(a.second);
  if (smem > limit)
    return fail(cudaErrorInvalidValue, std::to_string(smem) + " bytes of dynamic shared memory, the kernel allows " +
                                           std::to_string(limit) + " (cudaFuncSetAttribute)");
  g_grid_dim = grid;
  g_block_dim = block;
  g_fault.clear();
  for (unsigned z = 0; z < grid.z && g_fault.empty(); ++z)
    for (unsigned y = 0; y < grid.y && g_fault.empty(); ++y)
      for (unsigned x = 0; x < grid.x && g_fault.empty(); ++x) {
        g_block_idx = dim3(x, y, z);
        run_block(smem, body);
      }
  if (!g_fault.empty()) {
    const std::string where = "block (" + std::to_string(g_block_idx.x) + "," + std::to_string(g_block_idx.y) +
                              "," + std::to_string(g_block_idx.z) + ")";
    const std::string why = g_fault + " [" + where + "]";
    g_fault.clear();
    return fail(cudaErrorLaunchFailure, why);
  }
  return cudaSuccess;
}

}  // namespace soniq_emu

using namespace soniq_emu;

cudaError_t cudaGetLastError() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}
const char* cudaGetErrorString(cudaError_t e) {
  // the emulator's reason for the last failure (the texts callers report)
  static std::string text;
  text = e == cudaSuccess ? "no error" : "emulated CUDA error " + std::to_string(int(e)) + ": " + g_last_message;
  return text.c_str();
}
cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev) {
  const char* env = std::getenv("SONIQ_EMU_CC");
  const int cc = env ? std::atoi(env) : 90;
  if (dev != 0 || cc < 10) return fail(cudaErrorInvalidValue, "cudaDeviceGetAttribute: no such device or SONIQ_EMU_CC");
  if (attr == cudaDevAttrComputeCapabilityMajor) *value = cc / 10;
  else if (attr == cudaDevAttrComputeCapabilityMinor) *value = cc % 10;
  else return fail(cudaErrorInvalidValue, "cudaDeviceGetAttribute: attribute not emulated");
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || std::size_t(value) > kMaxSmem)
    return fail(cudaErrorInvalidValue, "cudaFuncSetAttribute: value out of range");
  for (auto& a : g_smem_attr)
    if (a.first == kernel) {
      a.second = value;
      return cudaSuccess;
    }
  g_smem_attr.emplace_back(kernel, value);
  return cudaSuccess;
}
