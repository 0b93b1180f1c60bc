// The dot product of two contiguous vectors, shared by the kernels (included by each header
// that is compiled once per instruction set, so it takes the caller's target).
#pragma once

#include <cstdint>
#include <cstring>

namespace attention_core {

// a . b: whole vectors of 64 bytes into two accumulators, summed at the end as a tree (a
// serial sum of many partial sums cost more than the products for E = 64).
template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
    constexpr int V = 64 / sizeof(T);
    typedef T vec __attribute__((vector_size(64)));
    vec acc0{}, acc1{};
    int64_t i = 0;
    for (; i + 2 * V <= n; i += 2 * V) {
        vec a0, a1, b0, b1;
        std::memcpy(&a0, a + i, sizeof(vec));
        std::memcpy(&b0, b + i, sizeof(vec));
        std::memcpy(&a1, a + i + V, sizeof(vec));
        std::memcpy(&b1, b + i + V, sizeof(vec));
        acc0 += a0 * b0;
        acc1 += a1 * b1;
    }
    for (; i + V <= n; i += V) {
        vec a0, b0;
        std::memcpy(&a0, a + i, sizeof(vec));
        std::memcpy(&b0, b + i, sizeof(vec));
        acc0 += a0 * b0;
    }
    acc0 += acc1;
    // the tree: lane j += lane j + width for width = V/2, V/4, ..., 1, on vector halves (a
    // loop over the lanes in memory stalled on reloading what it had just stored)
    typedef T half __attribute__((vector_size(32)));
    typedef T quarter __attribute__((vector_size(16)));
    half h0, h1;
    std::memcpy(&h0, &acc0, sizeof(half));
    std::memcpy(&h1, reinterpret_cast<const char*>(&acc0) + sizeof(half), sizeof(half));
    h0 += h1;
    quarter q0, q1;
    std::memcpy(&q0, &h0, sizeof(quarter));
    std::memcpy(&q1, reinterpret_cast<const char*>(&h0) + sizeof(quarter), sizeof(quarter));
    q0 += q1;
    T lanes[16 / sizeof(T)];
    std::memcpy(lanes, &q0, sizeof(quarter));
    for (int width = 8 / int(sizeof(T)); width >= 1; width /= 2) {
        for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
    }
    T sum = lanes[0];
    for (; i < n; ++i) sum += a[i] * b[i];
    return sum;
}

}  // namespace attention_core
