// A minimal parallel-for over independent work items with std::thread (no OpenMP: torch ships
// its own libgomp and mixing copies depends on import order), and a spin barrier for kernels
// whose team meets between phases (feedback.h). The caller passes the number of threads,
// normally torch.get_num_threads().
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace attention_core {

// A reusable barrier for a fixed team; waiting threads spin briefly, then yield.
class SpinBarrier {
  public:
    explicit SpinBarrier(int64_t parties) : parties_(parties) {}

    void wait() {
        if (parties_ == 1) return;
        const int64_t generation = generation_.load(std::memory_order_acquire);
        if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == parties_) {
            arrived_.store(0, std::memory_order_relaxed);
            generation_.fetch_add(1, std::memory_order_release);
            return;
        }
        for (int64_t spins = 0; generation_.load(std::memory_order_acquire) == generation;) {
            if (++spins > kSpins) {
                std::this_thread::yield();
            } else {
#if defined(__x86_64__) || defined(__i386__)
                __builtin_ia32_pause();
#endif
            }
        }
    }

  private:
    static constexpr int64_t kSpins = 2000;  // pause instructions: some tens of microseconds
    int64_t parties_;
    std::atomic<int64_t> arrived_{0};
    std::atomic<int64_t> generation_{0};
};

// [begin, end) of worker t's share of `items` among `workers`: contiguous, near-equal ranges.
inline void share(int64_t items, int64_t t, int64_t workers, int64_t& begin, int64_t& end) {
    begin = items * t / workers;
    end = items * (t + 1) / workers;
}

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
        int64_t begin, end;
        share(items, worker, workers, begin, end);
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
    } catch (...) {
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
