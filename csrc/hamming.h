// K-means in Hamming space, used to group queries by their hashes in clustered attention
// (Vyas et al. 2020, "Fast Transformers with Clustered Attention", arXiv 2007.04825), on the
// CPU. Each sequence (n, h) is clustered on its own (batch x heads spread over torch's OpenMP threads)
// with Lloyd's algorithm, exactly as attention_core.clustering.hamming describes:
//
// 1. centroid c starts as the hash at position min(floor(c * length / C), L - 1);
// 2. `iterations` times: assign every valid position (l < length) to the centroid with the
//    smallest popcount(hash ^ centroid) (ties: the lowest index), then set each bit of a
//    centroid when strictly more than half of its members have it; then each empty cluster,
//    in index order, takes the hash of the valid position farthest from its centroid (the
//    largest distance of the last assignment, ties: the lowest position), and the distances
//    drop to the one to that new centroid where it is closer; an empty cluster keeps its
//    centroid when every position sits on a centroid (distance 0);
// 3. assign once more; count members and set bits.
//
// Only the `bits` least significant bits of the hashes count. Padding positions get group C
// and distance 0. Deterministic: no randomness, no dependence on the thread count.
// No pybind11 and no torch here: bindings.cpp converts and checks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_dispatch.h"
#include "parallel.h"

namespace attention_core {
namespace hamming {

struct Args {
    int64_t N, H, L, C, bits, iterations;
    const int64_t* hashes;   // (N, H, L)
    const int64_t* lengths;  // (N,)
    int32_t* groups;         // (N, H, L)
    int32_t* counts;         // (N, H, C)
    int64_t* centroids;      // (N, H, C)
    int32_t* distances;      // (N, H, L)
    int32_t* bitcounts;      // (N, H, C, bits)
};

// One sequence; `codes` is scratch for its L masked hashes.
inline void cluster_head(const Args& a, int64_t item, std::vector<int64_t>& codes) {
    const int64_t L = a.L, C = a.C, B = a.bits;
    const int64_t n = item / a.H;
    const int64_t length = std::clamp<int64_t>(a.lengths[n], 0, L);
    const uint64_t mask = (uint64_t{1} << B) - 1;
    codes.resize(L);
    for (int64_t l = 0; l < L; ++l) codes[l] = int64_t(uint64_t(a.hashes[item * L + l]) & mask);
    int64_t* centroids = a.centroids + item * C;
    int32_t* groups = a.groups + item * L;
    int32_t* distances = a.distances + item * L;
    int32_t* counts = a.counts + item * C;
    int32_t* bitcounts = a.bitcounts + item * C * B;
    for (int64_t c = 0; c < C; ++c) {
        centroids[c] = L ? codes[std::min(c * length / C, L - 1)] : 0;
    }
    auto assign = [&]() {
        for (int64_t l = 0; l < L; ++l) {
            if (l >= length) {
                groups[l] = int32_t(C);
                distances[l] = 0;
                continue;
            }
            const uint64_t h = uint64_t(codes[l]);
            int best = 65;
            int64_t nearest = 0;
            for (int64_t c = 0; c < C; ++c) {
                const int d = __builtin_popcountll(h ^ uint64_t(centroids[c]));
                if (d < best) {
                    best = d;
                    nearest = c;
                }
            }
            groups[l] = int32_t(nearest);
            distances[l] = best;
        }
    };
    auto tally = [&]() {
        std::fill(counts, counts + C, 0);
        std::fill(bitcounts, bitcounts + C * B, 0);
        for (int64_t l = 0; l < length; ++l) {
            const int64_t g = groups[l];
            counts[g] += 1;
            int32_t* row = bitcounts + g * B;
            const uint64_t h = uint64_t(codes[l]);
            for (int64_t b = 0; b < B; ++b) row[b] += int32_t((h >> b) & 1);
        }
    };
    // an empty cluster takes the farthest position (see the header); far[l] starts as the
    // distances of the last assignment
    std::vector<int32_t> far;
    auto reseed_empty = [&]() {
        if (std::find(counts, counts + C, 0) == counts + C) return;  // no empty cluster
        far.assign(distances, distances + length);
        for (int64_t c = 0; c < C; ++c) {
            if (counts[c] != 0) continue;
            int64_t farthest = -1;
            int32_t best = 0;
            for (int64_t l = 0; l < length; ++l) {
                if (far[l] > best) {
                    best = far[l];
                    farthest = l;
                }
            }
            if (farthest < 0) return;  // every position sits on a centroid
            centroids[c] = codes[farthest];
            const uint64_t centroid = uint64_t(centroids[c]);
            for (int64_t l = 0; l < length; ++l) {
                const int32_t d = __builtin_popcountll(uint64_t(codes[l]) ^ centroid);
                far[l] = std::min(far[l], d);
            }
        }
    };
    assign();
    for (int64_t it = 0; it < a.iterations; ++it) {
        tally();
        reseed_empty();
        for (int64_t c = 0; c < C; ++c) {
            if (counts[c] == 0) continue;
            int64_t centroid = 0;
            const int32_t* row = bitcounts + c * B;
            for (int64_t b = 0; b < B; ++b) {
                if (2 * int64_t(row[b]) > counts[c]) centroid |= int64_t{1} << b;
            }
            centroids[c] = centroid;
        }
        assign();
    }
    tally();
}

inline void cluster_baseline(const Args& a, int64_t begin, int64_t end) {
    std::vector<int64_t> codes;
    for (int64_t item = begin; item < end; ++item) cluster_head(a, item, codes);
}

#if ATTENTION_CORE_X86_DISPATCH
// every AVX2 CPU has POPCNT
__attribute__((target("popcnt"), flatten)) inline void cluster_popcnt(const Args& a,
                                                                      int64_t begin,
                                                                      int64_t end) {
    std::vector<int64_t> codes;
    for (int64_t item = begin; item < end; ++item) cluster_head(a, item, codes);
}
#endif

inline void cluster(const Args& a, int64_t threads) {
    auto leaf = &cluster_baseline;
#if ATTENTION_CORE_X86_DISPATCH
    if (cpu_level() != CpuLevel::baseline) leaf = &cluster_popcnt;
#endif
    const int64_t heads = a.N * a.H;
    const int64_t work = heads * a.L * (a.C + a.bits) * (a.iterations + 1);
    const int64_t workers =
        std::max<int64_t>(1, std::min({threads, heads, work / (int64_t{1} << 16)}));
    parallel_for(heads, workers, [&](int64_t, int64_t begin, int64_t end) { leaf(a, begin, end); });
}

}  // namespace hamming
}  // namespace attention_core
