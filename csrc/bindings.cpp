// pybind11 bindings of attention_core._C. This file only converts and validates:
// Python passes the addresses of contiguous CPU buffers (tensor.data_ptr()) and their
// sizes; the kernels live in the headers. No libtorch and no CUDA are linked.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>

#include "hashing.h"

namespace py = pybind11;

namespace {

template <typename T>
T* as_ptr(std::uintptr_t address) {
    return reinterpret_cast<T*>(address);
}

void check_positive(const char* name, int64_t value) {
    if (value < 0) {
        std::ostringstream msg;
        msg << name << " must be non-negative; got " << value;
        throw std::invalid_argument(msg.str());
    }
}

template <typename scalar_t>
void compute_hashes(std::uintptr_t X, std::uintptr_t planes, std::uintptr_t hashes, int64_t n,
                    int64_t d, int64_t bits) {
    check_positive("n", n);
    check_positive("d", d);
    if (bits < 1 || bits > 63) {
        std::ostringstream msg;
        msg << "bits must be in [1, 63]; got " << bits;
        throw std::invalid_argument(msg.str());
    }
    py::gil_scoped_release release;
    attention_core::compute_hashes<scalar_t>(as_ptr<const scalar_t>(X),
                                             as_ptr<const scalar_t>(planes),
                                             as_ptr<int64_t>(hashes), n, d, bits);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "Compiled CPU kernels of attention_core (private; use the Python modules).";
    m.def("compute_hashes_f32", &compute_hashes<float>, py::arg("X"), py::arg("planes"),
          py::arg("hashes"), py::arg("n"), py::arg("d"), py::arg("bits"));
    m.def("compute_hashes_f64", &compute_hashes<double>, py::arg("X"), py::arg("planes"),
          py::arg("hashes"), py::arg("n"), py::arg("d"), py::arg("bits"));
}
