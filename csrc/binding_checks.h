// Checks shared by the pybind11 bindings: what a Python caller passes before a kernel runs
// (addresses, the thread count, epsilon). Each throws std::invalid_argument (a ValueError in
// Python) naming the argument and the value it got.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <stdexcept>

namespace attention_core {

// The element strides of an operand's three leading dimensions (its last is contiguous).
using Strides3 = std::array<int64_t, 3>;

// The buffer at an address that Python passed (tensor.data_ptr()).
template <typename T>
T* as_ptr(std::uintptr_t address) {
    return reinterpret_cast<T*>(address);
}

inline void check_positive(const char* name, int64_t value) {
    if (value < 0) {
        std::ostringstream msg;
        msg << name << " must be non-negative; got " << value;
        throw std::invalid_argument(msg.str());
    }
}

// A null address is only allowed for an empty buffer.
inline void require_address(const char* name, std::uintptr_t address, int64_t elements) {
    if (address == 0 && elements > 0) {
        std::ostringstream msg;
        msg << name << " must be a buffer address; got a null pointer";
        throw std::invalid_argument(msg.str());
    }
}

inline void require_threads(int64_t threads) {
    if (threads < 1) {
        std::ostringstream msg;
        msg << "threads must be a positive int; got " << threads;
        throw std::invalid_argument(msg.str());
    }
}

inline void require_eps(double eps) {
    if (!std::isfinite(eps) || eps < 0) {
        std::ostringstream msg;
        msg << "eps must be a finite non-negative number; got " << eps;
        throw std::invalid_argument(msg.str());
    }
}

}  // namespace attention_core
