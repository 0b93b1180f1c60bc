// Transparent huge pages for large output buffers (Linux).
//
// A large tensor comes from a fresh anonymous mapping: every 4 KiB page of an output is
// faulted in and zeroed by the kernel when it is first written. For a 32 MiB output that is
// 8192 page faults, measured here to cost about as much as the causal product itself.
// `advise_huge_pages` asks for 2 MiB pages on the whole 2 MiB pages inside such a buffer
// (madvise(MADV_HUGEPAGE), effective when /sys/kernel/mm/transparent_hugepage/enabled is
// `madvise` or `always`): 512 times fewer faults. It is only a hint: results never depend on
// it, it touches no memory outside the buffer's own pages, and it is skipped below
// kHugePageMinBytes (smaller buffers are usually recycled heap memory, already faulted in).
// No pybind11 and no torch here.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace attention_core {

constexpr std::uintptr_t kHugePageBytes = std::uintptr_t{1} << 21;
constexpr std::size_t kHugePageMinBytes = std::size_t{16} << 20;

// Advises huge pages for the 2 MiB-aligned pages that lie wholly inside [data, data + bytes).
inline void advise_huge_pages(const void* data, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (data == nullptr || bytes < kHugePageMinBytes) return;
    const auto start = reinterpret_cast<std::uintptr_t>(data);
    const std::uintptr_t begin = (start + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
    const std::uintptr_t end = (start + bytes) & ~(kHugePageBytes - 1);
    if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
    (void)data;
    (void)bytes;
#endif
}

}  // namespace attention_core
