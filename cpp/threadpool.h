// A small persistent thread pool for the kernels. One parallel job runs at a time;
// a caller that finds the pool busy (another Python thread, or a nested call) runs its
// job inline instead of waiting, so concurrent callers never deadlock or oversubscribe.
// After fork() the child starts with no workers and makes new ones on first use.
#pragma once
#include <cstdint>
#include <functional>

namespace soniq {

int default_num_threads();  // physical cores in this process's CPU affinity set
int get_num_threads();
void set_num_threads(int n);  // n >= 1

// Calls fn(i) for i in [0, n), spread over the pool; rethrows the first exception.
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);

}  // namespace soniq
