// A chain of step ops (residual_step.h, linear_step.h) run one after another in one call: the
// products, norms and attention steps of a few rows, where a call from Python per op costs
// more than the op (see attention_core.step_chain). The ops and their order are the caller's;
// nothing here knows a model. No pybind11 and no torch here: the bindings validate.
#pragma once

#include <cstdint>
#include <variant>
#include <vector>

#include "linear_step.h"
#include "residual_step.h"

namespace attention_core {
namespace step_chain {

template <typename T>
using Op = std::variant<residual_step::Linear<T>, residual_step::FeedForward<T>,
                        linear_step::Problem<T>>;

// Runs the ops in order, each on torch's thread pool (`threads` threads), as the op's own call
// would.
template <typename T>
void run(const std::vector<Op<T>>& ops, int64_t threads) {
    for (const Op<T>& op : ops) {
        if (const auto* linear = std::get_if<residual_step::Linear<T>>(&op)) {
            residual_step::residual_linear<T>(*linear, threads);
        } else if (const auto* feed_forward = std::get_if<residual_step::FeedForward<T>>(&op)) {
            residual_step::residual_feed_forward<T>(*feed_forward, threads);
        } else {
            linear_step::linear_attention_step<T>(std::get<linear_step::Problem<T>>(op), threads);
        }
    }
}

}  // namespace step_chain
}  // namespace attention_core
