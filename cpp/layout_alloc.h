// Memory for large weight execution layouts (cpp/wlayout.h). GEMV streams a layout once per
// call as 4 interleaved tile streams; on 4 KiB pages every 4 KiB of each stream is a TLB miss
// and a page walk (a 29 MB weight spans ~7,000 pages, twice what the L2 TLB holds), and the
// hardware prefetchers stop at each page. Transparent huge pages (2 MiB) remove both.
#pragma once
#include <cstddef>

namespace soniq {

// n bytes (n > 0), 2 MiB-aligned, advised for transparent huge pages before anything touches
// them (the kernel then backs whole 2 MiB pieces with huge pages where it can; 4 KiB pages
// otherwise). Resident: at most n rounded up to 4 KiB. Throws std::bad_alloc.
void* layout_alloc(size_t n);
void layout_free(void* p, size_t n);

}  // namespace soniq
