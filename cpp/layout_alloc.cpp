#include "layout_alloc.h"

#include <cstdint>
#include <cstdlib>
#include <new>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace soniq {
namespace {
constexpr size_t kHuge = size_t(2) << 20;
constexpr size_t kPage = 4096;
size_t page_round(size_t n) { return (n + kPage - 1) & ~(kPage - 1); }
}  // namespace

#ifdef __linux__
void* layout_alloc(size_t n) {
  if (n == 0) throw std::bad_alloc();
  // map 2 MiB more, keep the 2 MiB-aligned part: huge pages need aligned 2 MiB pieces
  const size_t body = page_round(n), len = body + kHuge;
  void* raw = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  const uintptr_t r = reinterpret_cast<uintptr_t>(raw), a = (r + kHuge - 1) & ~uintptr_t(kHuge - 1);
  if (a > r) munmap(raw, a - r);
  if (r + len > a + body) munmap(reinterpret_cast<void*>(a + body), r + len - (a + body));
  madvise(reinterpret_cast<void*>(a), body, MADV_HUGEPAGE);  // may fail (THP off): 4 KiB pages then
  return reinterpret_cast<void*>(a);
}

void layout_free(void* p, size_t n) {
  if (p) munmap(p, page_round(n));
}
#else
void* layout_alloc(size_t n) {
  void* p = n ? std::aligned_alloc(kHuge, (n + kHuge - 1) & ~(kHuge - 1)) : nullptr;
  if (!p) throw std::bad_alloc();
  return p;
}

void layout_free(void* p, size_t) { std::free(p); }
#endif

}  // namespace soniq
