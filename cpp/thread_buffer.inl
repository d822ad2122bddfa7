// A per-thread scratch buffer for the ISA kernels. Included inside each file's own namespace
// (no include guard: each including file gets its own copy, in an anonymous namespace, so no
// template instance built with one file's ISA flags is shared with baseline code).
namespace {

struct AlignedFree {
  void operator()(int8_t* p) const { std::free(p); }
};

// A per-thread buffer of at least `bytes` (64-byte aligned, kept for the next call); one per
// Slot.
template <int Slot>
int8_t* thread_buffer(int64_t bytes) {
  thread_local std::unique_ptr<int8_t, AlignedFree> buf;  // dynamic: no large static TLS in a dlopen'ed module
  thread_local int64_t have = 0;
  if (have < bytes) {
    buf.reset(static_cast<int8_t*>(std::aligned_alloc(64, size_t((bytes + 63) / 64 * 64))));
    if (!buf) throw std::bad_alloc();
    have = bytes;
  }
  return buf.get();
}

}  // namespace
