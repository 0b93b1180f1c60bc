// Work sharing for the CPU kernels.
//
// parallel_for runs on OpenMP, which this extension links dynamically as libgomp.so.1: after
// `import torch` (attention_core imports torch before _C) that soname resolves to the copy
// torch has already loaded, so the kernels run on torch's own thread pool and follow
// torch.set_num_threads. Built without OpenMP (macOS clang without libomp) it runs serially.
// No kernel starts threads of its own.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace attention_core {

// [begin, end) of worker t's share of `items` among `workers`: contiguous, near-equal ranges.
inline void share(int64_t items, int64_t t, int64_t workers, int64_t& begin, int64_t& end) {
    begin = items * t / workers;
    end = items * (t + 1) / workers;
}

// Whether the kernels were compiled with OpenMP (otherwise parallel_for is serial).
inline bool openmp_enabled() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
}

// The number of threads that ran the last parallel_for (its OpenMP team, 1 when serial); tests
// read it through _C to check that the kernels follow torch.set_num_threads.
inline std::atomic<int64_t>& last_team_size() {
    static std::atomic<int64_t> size{1};
    return size;
}

// Calls fn(worker, begin, end) on `workers` contiguous, near-equal ranges of [0, items), where
// workers = min(threads, items), on an OpenMP team of `workers` threads (the calling thread
// is one of them). When OpenMP gives a smaller team (nested parallelism, thread limits), each
// thread runs several ranges in turn, so every worker index is still called exactly once.
// Exceptions thrown by a worker are rethrown here after every worker has finished.
template <typename Fn>
void parallel_for(int64_t items, int64_t threads, Fn&& fn) {
    if (items <= 0) return;
    const int64_t workers = std::max<int64_t>(1, std::min(threads, items));
    if (workers == 1) {
        last_team_size().store(1, std::memory_order_relaxed);
        fn(int64_t{0}, int64_t{0}, items);
        return;
    }
    std::vector<std::exception_ptr> errors(workers);
    auto run = [&](int64_t worker) {
        int64_t begin, end;
        share(items, worker, workers, begin, end);
        try {
            fn(worker, begin, end);
        } catch (...) {
            errors[worker] = std::current_exception();
        }
    };
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(workers))
    {
        const int64_t team = omp_get_num_threads();
        const int64_t member = omp_get_thread_num();
        if (member == 0) last_team_size().store(team, std::memory_order_relaxed);
        for (int64_t worker = member; worker < workers; worker += team) run(worker);
    }
#else
    last_team_size().store(1, std::memory_order_relaxed);
    for (int64_t worker = 0; worker < workers; ++worker) run(worker);
#endif
    for (auto& error : errors) {
        if (error) std::rethrow_exception(error);
    }
}

}  // namespace attention_core
