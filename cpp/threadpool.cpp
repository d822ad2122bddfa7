#include "threadpool.h"

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
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

struct Pool {
  std::mutex job_mutex;  // held by the caller running a parallel job
  std::mutex m;
  std::condition_variable cv_work, cv_done;
  std::vector<std::thread> workers;
  std::atomic<int> wanted{0};  // total threads including the caller (read without locks)
  uint64_t generation = 0; // bumped for each job
  std::atomic<uint64_t> published{0};  // = generation, readable without the lock (spin hint)
  bool stopping = false;
  // current job
  const std::function<void(int64_t)>* fn = nullptr;
  int64_t n = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int> active{0};  // changed under m; read without it while spinning
  std::exception_ptr error;

  void run_tasks() {
    for (;;) {
      int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) break;
      try {
        (*fn)(i);
      } catch (...) {
        std::lock_guard<std::mutex> g(m);
        if (!error) error = std::current_exception();
        next.store(n, std::memory_order_relaxed);
      }
    }
  }

  // `seen` starts at the generation current when the worker is made: a worker made by a
  // resize must not mistake the last finished job for a new one (it would decrement
  // `active` twice and let a later job return while it still runs that job's tasks).
  void worker_loop(uint64_t seen) {
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
      run_tasks();
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
    for (int i = 0; i < need; ++i) workers.emplace_back([this, gen] { worker_loop(gen); });
  }
};

Pool* g_pool = nullptr;
std::mutex g_pool_mutex;
int g_wanted_after_fork = 0;  // the parent's thread count, kept for the child's new pool

void after_fork_child() {
  // The child has only the forking thread: abandon the parent's pool objects (their
  // threads do not exist here) and build a fresh pool on first use.
  if (g_pool) g_wanted_after_fork = g_pool->wanted.load();
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
    g_pool->wanted = g_wanted_after_fork > 0 ? g_wanted_after_fork : default_num_threads();
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

int get_num_threads() { return pool().wanted; }

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("num_threads must be >= 1 (got " + std::to_string(n) + ")");
  Pool& p = pool();
  std::lock_guard<std::mutex> job(p.job_mutex);  // never resize under a running job
  p.wanted = n;
  p.ensure_workers();
}

void parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  Pool& p = pool();
  std::unique_lock<std::mutex> job(p.job_mutex, std::try_to_lock);
  if (!job.owns_lock() || p.wanted <= 1 || n == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  p.ensure_workers();
  {
    std::lock_guard<std::mutex> g(p.m);
    p.fn = &fn;
    p.n = n;
    p.next.store(0);
    p.error = nullptr;
    p.active = int(p.workers.size());
    ++p.generation;
    p.published.store(p.generation, std::memory_order_release);
  }
  p.cv_work.notify_all();
  p.run_tasks();
  Pool::spin_until([&] { return p.active.load(std::memory_order_acquire) == 0; });
  std::unique_lock<std::mutex> lk(p.m);
  p.cv_done.wait(lk, [&] { return p.active == 0; });
  p.fn = nullptr;
  if (p.error) {
    std::exception_ptr e = p.error;
    p.error = nullptr;
    std::rethrow_exception(e);
  }
}

}  // namespace soniq
