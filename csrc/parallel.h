// A minimal parallel-for over independent work items with std::thread (no OpenMP: torch ships
// its own libgomp and mixing copies depends on import order). The caller passes the number of
// threads, normally torch.get_num_threads().
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <system_error>
#include <thread>
#include <vector>

namespace attention_core {

// Calls fn(worker, begin, end) on `workers` contiguous, near-equal ranges of [0, items), where
// workers = min(threads, items); worker 0 runs on the calling thread. Exceptions thrown by a
// worker are rethrown here after every worker has finished.
template <typename Fn>
void parallel_for(int64_t items, int64_t threads, Fn&& fn) {
    if (items <= 0) return;
    const int64_t workers = std::max<int64_t>(1, std::min(threads, items));
    if (workers == 1) {
        fn(int64_t{0}, int64_t{0}, items);
        return;
    }
    std::vector<std::exception_ptr> errors(workers);
    auto run = [&](int64_t worker) {
        const int64_t begin = items * worker / workers;
        const int64_t end = items * (worker + 1) / workers;
        try {
            fn(worker, begin, end);
        } catch (...) {
            errors[worker] = std::current_exception();
        }
    };
    std::vector<std::thread> pool;
    pool.reserve(workers - 1);
    int64_t worker = 1;
    try {
        for (; worker < workers; ++worker) pool.emplace_back(run, worker);
    } catch (const std::system_error&) {
        // the system refused a thread: run the remaining ranges on this one
    }
    for (int64_t rest = worker; rest < workers; ++rest) run(rest);
    run(0);
    for (auto& thread : pool) thread.join();
    for (auto& error : errors) {
        if (error) std::rethrow_exception(error);
    }
}

}  // namespace attention_core
