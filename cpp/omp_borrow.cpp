#include "omp_borrow.h"

#include <dlfcn.h>
#include <pthread.h>

namespace soniq {
namespace omp {
namespace {

struct Runtime {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;  // GOMP_parallel (GCC >= 4.9 ABI)
  int (*max_threads)() = nullptr;
  int (*in_parallel)() = nullptr;
  int (*thread_num)() = nullptr;
  std::string path;
};

bool g_forked = false;  // set in a fork()ed child: its copy of the team has no threads

void mark_forked() { g_forked = true; }

// Registered when the library loads, not at the first kernel call: a process may fork
// after torch's ops used the team and before soniq ran anything.
const bool g_atfork_registered = pthread_atfork(nullptr, nullptr, mark_forked) == 0;

const Runtime* load() {
  // RTLD_NOLOAD: only a libgomp some other library (torch) already loaded; never a new one
  void* h = dlopen("libgomp.so.1", RTLD_LAZY | RTLD_LOCAL | RTLD_NOLOAD);
  if (!h) return nullptr;
  auto* rt = new Runtime();  // kept for the process's life, as the library stays loaded
  rt->parallel = reinterpret_cast<decltype(rt->parallel)>(dlsym(h, "GOMP_parallel"));
  rt->max_threads = reinterpret_cast<decltype(rt->max_threads)>(dlsym(h, "omp_get_max_threads"));
  rt->in_parallel = reinterpret_cast<decltype(rt->in_parallel)>(dlsym(h, "omp_in_parallel"));
  rt->thread_num = reinterpret_cast<decltype(rt->thread_num)>(dlsym(h, "omp_get_thread_num"));
  if (!rt->parallel || !rt->max_threads || !rt->in_parallel || !rt->thread_num) {
    delete rt;
    return nullptr;
  }
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(rt->parallel), &info) && info.dli_fname) rt->path = info.dli_fname;
  return rt;
}

// Looked up once, at the first kernel call: soniq's Python package imports torch (and so
// its libgomp) before it loads soniq._C. Without torch (the C++ tools) there is none.
const Runtime* runtime() {
  static const Runtime* rt = load();
  return rt;
}

}  // namespace

bool loaded() { return runtime() != nullptr; }

bool usable() { return g_atfork_registered && !g_forked && runtime() != nullptr; }

std::string library_path() {
  const Runtime* rt = runtime();
  return rt ? rt->path : std::string();
}

int max_threads() { return runtime()->max_threads(); }

int thread_num() { return runtime()->thread_num(); }

bool in_parallel() {
  const Runtime* rt = runtime();
  return rt && rt->in_parallel();
}

void parallel(void (*body)(void*), void* ctx, unsigned threads) { runtime()->parallel(body, ctx, threads, 0); }

}  // namespace omp
}  // namespace soniq
