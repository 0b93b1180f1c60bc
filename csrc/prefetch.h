// Software prefetch of rows that a kernel reads (or writes) a little later: hints, with no
// effect on results. Rows read through strides (the (N, L, H, E) layout seen as (N, H, L, E))
// are not followed by the hardware prefetchers, so the loops over them prefetch a few rows
// ahead themselves.
#pragma once

#include <cstdint>

namespace attention_core {

// How many rows ahead the loops over strided rows prefetch (8 measured best for the feature
// map's loop over (N, L, H, E) rows, against 4 and 16).
constexpr int64_t kPrefetchRows = 8;

// Brings `bytes` bytes at `row` towards the caches, for writing when `write` is set.
inline void prefetch_bytes(const void* row, int64_t bytes, bool write = false) {
    const char* p = static_cast<const char*>(row);
    for (int64_t b = 0; b < bytes; b += 64) {
        if (write) {
            __builtin_prefetch(p + b, 1);
        } else {
            __builtin_prefetch(p + b);
        }
    }
}

// The same for a row of `cols` elements of T.
template <typename T>
inline void prefetch_row(const T* row, int64_t cols, bool write = false) {
    prefetch_bytes(row, cols * int64_t(sizeof(T)), write);
}

}  // namespace attention_core
