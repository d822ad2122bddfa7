// Kernel threads. A parallel job runs on the OpenMP team torch already uses (its libgomp,
// borrowed at run time: cpp/omp_borrow.h) when soniq's thread count is torch's (the
// default), so soniq's kernels and torch's ops between them share one set of threads instead
// of two sets fighting for the cores. Otherwise (no OpenMP runtime loaded, as in the C++
// tools; a fork()ed child; a count set apart from torch's; or forced) a small persistent pool
// of soniq's own runs it. One parallel job runs at a time; a caller that finds a job running
// (another Python thread, a nested call, a call from inside an OpenMP region) runs its job
// inline instead of waiting, so concurrent callers never deadlock or oversubscribe.
// After fork() the child starts with no pool workers and makes new ones on first use.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace soniq {

int default_num_threads();  // physical cores in this process's CPU affinity set
// set_num_threads's n; until it is called, torch's count (the OpenMP runtime's
// omp_get_max_threads() in the calling thread, which torch.set_num_threads sets), or
// default_num_threads() where no OpenMP runtime is loaded.
int get_num_threads();
void set_num_threads(int n);  // n >= 1

// Calls fn(i) for i in [0, n), spread over the threads; rethrows the first exception.
// Which thread runs which i never changes a result (each i writes its own outputs).
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);

// An order of tasks for parallel_for on `threads` threads, given each task's work in an order
// where neighbours write neighbouring outputs: cut into `threads` contiguous segments of about
// equal work, each segment largest first, each padded with -1 (no task) to one length, so that
// parallel_for's equal runs are the segments. Thread t then writes one range of the output (its
// L2 keeps it; interleaved tasks made the cores' prefetchers and stores fight over the lines
// at each task's edges) and ends on its smallest tasks (which an idle thread claims first).
std::vector<int64_t> balanced_runs(const std::vector<int64_t>& work, int64_t threads);

// Rows per task of a row-wise pass over M rows of row_elems values each (activation
// quantization): all rows in one task up to 16K values (run inline), else tasks of 4K-16K
// values, at least 4 per thread while they stay >= 4K. At M = 128, K = 384 on 2 threads that is
// 8 tasks of 16 rows, where a fixed 16K made 3 (2 + 1: one thread idle for a third).
int64_t rows_per_task(int64_t M, int64_t row_elems);

// "auto" (torch's OpenMP team where it can be used, else the pool) or "pool" (always
// soniq's own); for tests and benchmarks that compare the two.
void set_thread_backend(const std::string& name);
// What a parallel_for from this thread would use now: "openmp" or "pool".
std::string thread_backend();

}  // namespace soniq
