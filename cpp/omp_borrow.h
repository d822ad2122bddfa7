// The OpenMP runtime torch already loaded (its wheel ships libgomp.so.1), borrowed at run
// time: found with dlopen(RTLD_NOLOAD) and called through function pointers, so the core
// neither links libgomp nor needs -fopenmp, and never loads a second OpenMP runtime. A
// kernel job run on that runtime's team uses the very threads torch's own parallel regions
// use (and that spin between them), instead of a second set fighting them for the cores.
#pragma once

#include <string>

namespace soniq {
namespace omp {

bool loaded();                // libgomp is loaded in this process
// loaded() and this is not a fork()ed child: libgomp's team does not survive fork (the
// child's copy has no threads, and a parallel region in it would wait forever).
bool usable();
std::string library_path();  // the libgomp file found ("" when none)
int max_threads();           // omp_get_max_threads() of the calling thread (torch's count); only when loaded()
bool in_parallel();          // the caller is inside an OpenMP parallel region
int thread_num();            // omp_get_thread_num(): inside a region of parallel(), 0 = the caller

// Runs body(ctx) once on each of `threads` team threads (the caller included) and returns
// when all are done. body must not throw. Only when usable().
void parallel(void (*body)(void*), void* ctx, unsigned threads);

}  // namespace omp
}  // namespace soniq
