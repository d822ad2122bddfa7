#include "threadpool.h"

#include "omp_borrow.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace soniq {
namespace {

// One job's tasks, handed out one index at a time. Thread number t (0 = the caller) takes slot t:
// a contiguous run of the tasks, as torch's static OpenMP schedule gives thread t a contiguous
// run of the rows, so a row task mostly reads what the same core's torch op just wrote
// (and writes what it will read next). Claims come from the slot's own counter on its own cache
// line; a thread whose slot is empty claims from the others'.
struct Tasks {
  static constexpr int kMaxSlots = 64;
  struct alignas(64) Slot {
    std::atomic<int64_t> next{0};  // the slot's next task
    int64_t end = 0;               // one past its last
  };
  const std::function<void(int64_t)>* fn = nullptr;
  int slots = 1;
  std::mutex m;
  std::exception_ptr error;
  Slot slot[kMaxSlots];

  // threads: how many will call run() (thread numbers past it share the slots)
  void reset(const std::function<void(int64_t)>* f, int64_t count, int threads) {
    fn = f;
    slots = int(std::clamp<int64_t>(std::min<int64_t>(threads, count), 1, kMaxSlots));
    const int64_t base = count / slots, extra = count % slots;  // the first `extra` slots take one more
    for (int s = 0; s < slots; ++s) {
      slot[s].next.store(s * base + std::min<int64_t>(s, extra), std::memory_order_relaxed);
      slot[s].end = (s + 1) * base + std::min<int64_t>(s + 1, extra);
    }
    error = nullptr;
  }

  void run(int who) {
    for (int k = 0; k < slots; ++k) {
      Slot& sl = slot[(who + k) % slots];
      for (;;) {
        const int64_t i = sl.next.fetch_add(1, std::memory_order_relaxed);
        if (i >= sl.end) break;
        try {
          (*fn)(i);
        } catch (...) {
          std::lock_guard<std::mutex> g(m);
          if (!error) error = std::current_exception();
          for (int o = 0; o < slots; ++o) slot[o].next.store(slot[o].end, std::memory_order_relaxed);
        }
      }
    }
  }

  void rethrow() {
    if (error) {
      std::exception_ptr e = error;
      error = nullptr;
      std::rethrow_exception(e);
    }
  }
};

struct Pool {
  std::mutex job_mutex;  // held by the caller running a parallel job
  std::mutex m;
  std::condition_variable cv_work, cv_done;
  std::vector<std::thread> workers;
  int wanted = 1;  // total threads including the caller (changed under job_mutex)
  uint64_t generation = 0; // bumped for each job
  std::atomic<uint64_t> published{0};  // = generation, readable without the lock (spin hint)
  bool stopping = false;
  Tasks job;  // the current job
  std::atomic<int> active{0};  // changed under m; read without it while spinning

  // `seen` starts at the generation current when the worker is made: a worker made by a
  // resize must not mistake the last finished job for a new one (it would decrement
  // `active` twice and let a later job return while it still runs that job's tasks).
  void worker_loop(uint64_t seen, int who) {  // who: the worker's thread number (1, 2, ...)
    std::unique_lock<std::mutex> lk(m);
    for (;;) {
      if (!stopping && generation == seen) {  // jobs come in bursts (one per layer): wait awake a little
        lk.unlock();
        spin_until([&] { return published.load(std::memory_order_acquire) != seen; });
        lk.lock();
      }
      cv_work.wait(lk, [&] { return stopping || generation != seen; });
      if (stopping) return;
      seen = generation;
      lk.unlock();
      job.run(who);
      lk.lock();
      if (--active == 0) cv_done.notify_all();
    }
  }

  // Up to kSpin of yielding (sched_yield hands the core to any runnable thread, e.g. torch's),
  // so back-to-back jobs skip the futex sleep and wake-up (tens of microseconds each).
  template <class Pred>
  static void spin_until(Pred done) {
    constexpr auto kSpin = std::chrono::microseconds(50);
    const auto t0 = std::chrono::steady_clock::now();
    while (!done() && std::chrono::steady_clock::now() - t0 < kSpin) std::this_thread::yield();
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> g(m);
      stopping = true;
    }
    cv_work.notify_all();
    for (auto& t : workers) t.join();
    workers.clear();
    stopping = false;
  }

  void ensure_workers() {
    int need = wanted - 1;
    if (int(workers.size()) == need) return;
    stop_workers();
    uint64_t gen;
    {
      std::lock_guard<std::mutex> g(m);
      gen = generation;
    }
    for (int i = 0; i < need; ++i) workers.emplace_back([this, gen, i] { worker_loop(gen, i + 1); });
  }
};

Pool* g_pool = nullptr;
std::mutex g_pool_mutex;
std::atomic<int> g_explicit{0};   // set_num_threads's n; 0 = follow torch
std::atomic<bool> g_force_pool{false};
std::mutex g_omp_job;             // held by the caller running a job on the OpenMP team
Tasks g_omp_tasks;

void after_fork_child() {
  // The child has only the forking thread: abandon the parent's pool objects (their
  // threads do not exist here) and build a fresh pool on first use.
  g_pool = nullptr;
  new (&g_pool_mutex) std::mutex();
}

Pool& pool() {
  std::lock_guard<std::mutex> g(g_pool_mutex);
  if (!g_pool) {
    static bool registered = false;
    if (!registered) {
      pthread_atfork(nullptr, nullptr, after_fork_child);
      registered = true;
    }
    g_pool = new Pool();  // never freed: workers may outlive static destructors
  }
  return *g_pool;
}

int count_physical_cores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return int(std::thread::hardware_concurrency());
  std::set<std::string> cores;
  int logical = 0;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (!CPU_ISSET(cpu, &set)) continue;
    ++logical;
    std::string base = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
    std::ifstream pkg(base + "physical_package_id"), core(base + "core_id");
    std::string p, c;
    if (pkg >> p && core >> c) cores.insert(p + ":" + c);
    else cores.insert("cpu" + std::to_string(cpu));
  }
  int n = cores.empty() ? logical : int(cores.size());
  return n > 0 ? n : 1;
}

}  // namespace

int default_num_threads() {
  static const int n = count_physical_cores();
  return n;
}

int get_num_threads() {
  int n = g_explicit.load(std::memory_order_relaxed);
  if (n > 0) return n;
  return omp::loaded() ? std::max(1, omp::max_threads()) : default_num_threads();
}

namespace {

// torch's team, when usable and of the job's size: a team of another size would make
// libgomp end or create threads at every switch between soniq's regions and torch's.
bool use_omp(int threads) {
  return !g_force_pool.load(std::memory_order_relaxed) && omp::usable() && threads == omp::max_threads();
}

}  // namespace

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("num_threads must be >= 1 (got " + std::to_string(n) + ")");
  g_explicit.store(n);  // the pool resizes at its next job, under its job lock
}

void set_thread_backend(const std::string& name) {
  if (name != "auto" && name != "pool")
    throw std::invalid_argument("thread backend must be 'auto' or 'pool' (got '" + name + "')");
  g_force_pool.store(name == "pool");
}

std::string thread_backend() { return use_omp(get_num_threads()) ? "openmp" : "pool"; }

namespace {

void run_inline(int64_t n, const std::function<void(int64_t)>& fn) {
  for (int64_t i = 0; i < n; ++i) fn(i);
}

// On torch's OpenMP team: the threads torch's own ops just used (and spin between regions).
void run_on_omp(int64_t n, const std::function<void(int64_t)>& fn, int threads) {
  std::unique_lock<std::mutex> job(g_omp_job, std::try_to_lock);
  if (!job.owns_lock() || omp::in_parallel()) return run_inline(n, fn);
  g_omp_tasks.reset(&fn, n, threads);
  // the whole team even when n < threads: libgomp ends the threads a smaller team leaves
  // out, and torch's next region would have to create them again
  omp::parallel([](void* t) { static_cast<Tasks*>(t)->run(omp::thread_num()); }, &g_omp_tasks, unsigned(threads));
  g_omp_tasks.fn = nullptr;
  g_omp_tasks.rethrow();
}

void run_on_pool(int64_t n, const std::function<void(int64_t)>& fn, int threads) {
  Pool& p = pool();
  std::unique_lock<std::mutex> job(p.job_mutex, std::try_to_lock);
  if (!job.owns_lock()) return run_inline(n, fn);
  p.wanted = threads;
  p.ensure_workers();
  {
    std::lock_guard<std::mutex> g(p.m);
    p.job.reset(&fn, n, threads);
    p.active = int(p.workers.size());
    ++p.generation;
    p.published.store(p.generation, std::memory_order_release);
  }
  p.cv_work.notify_all();
  p.job.run(0);
  Pool::spin_until([&] { return p.active.load(std::memory_order_acquire) == 0; });
  std::unique_lock<std::mutex> lk(p.m);
  p.cv_done.wait(lk, [&] { return p.active == 0; });
  p.job.fn = nullptr;
  p.job.rethrow();
}

}  // namespace

std::vector<int64_t> balanced_runs(const std::vector<int64_t>& work, int64_t threads) {
  const auto n = int64_t(work.size());
  const int64_t T = std::clamp<int64_t>(threads, 1, std::max<int64_t>(n, 1));
  std::vector<int64_t> prefix(size_t(n + 1), 0);
  for (int64_t i = 0; i < n; ++i) prefix[size_t(i + 1)] = prefix[size_t(i)] + std::max<int64_t>(work[size_t(i)], 0);
  const int64_t total = prefix[size_t(n)];
  // bound[t]: the first task of segment t, where the work before it is nearest t / T of the total
  std::vector<int64_t> bound(size_t(T + 1), n);
  bound[0] = 0;
  for (int64_t t = 1; t < T; ++t) {
    int64_t c = bound[size_t(t - 1)];
    auto off = [&](int64_t k) { return std::abs(prefix[size_t(k)] * T - total * t); };
    while (c < n && off(c + 1) <= off(c)) ++c;
    bound[size_t(t)] = c;
  }
  int64_t len = 0;
  for (int64_t t = 0; t < T; ++t) len = std::max(len, bound[size_t(t + 1)] - bound[size_t(t)]);
  std::vector<int64_t> order;
  order.reserve(size_t(len * T));
  for (int64_t t = 0; t < T; ++t) {
    const auto first = order.size();
    for (int64_t i = bound[size_t(t)]; i < bound[size_t(t + 1)]; ++i) order.push_back(i);
    std::stable_sort(order.begin() + std::ptrdiff_t(first), order.end(),
                     [&](int64_t x, int64_t y) { return work[size_t(x)] > work[size_t(y)]; });
    order.resize(first + size_t(len), -1);
  }
  return order;
}

int64_t rows_per_task(int64_t M, int64_t row_elems) {
  const int64_t e = std::max<int64_t>(1, row_elems);
  if (M * e <= 16384) return std::max<int64_t>(1, M);  // one task, run inline: no pool round trip
  const int64_t lo = (4096 + e - 1) / e, hi = (16384 + e - 1) / e;
  const int64_t want = (M + 4 * get_num_threads() - 1) / (4 * get_num_threads());
  return std::max<int64_t>(1, std::clamp(want, lo, hi));
}

void parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  int threads = n == 1 ? 1 : get_num_threads();
  if (threads <= 1) return run_inline(n, fn);
  if (use_omp(threads)) return run_on_omp(n, fn, threads);
  run_on_pool(n, fn, threads);
}

}  // namespace soniq
