"""The kernels' few-row products on torch's own BLAS (``csrc/blas.h``): every path (the
measured choice, BLAS at every row count, the own kernels) against plain formulas in float32
and float64 over the row counts around the switch, strided inputs, with 1 and 2 threads; the
BLAS path is torch.mm's very function (bit-identical results); the thread count of torch's MKL
follows torch.set_num_threads; a function that fails the installation check is not used."""

from __future__ import annotations

import ctypes
import os

import pytest
import torch
import torch.nn.functional as F

from attention_core import _extension
from attention_core.residual_step import residual_feed_forward, residual_linear
from attention_core.testing import assert_close

pytestmark = pytest.mark.skipif(
    not _extension.kernels_available(), reason="attention_core._C is not compiled"
)
needs_blas = pytest.mark.skipif(
    not _extension.blas_in_use(torch.float32), reason="torch exports no sgemm_ here"
)

# around the switch to BLAS: 20 rows with 1 thread, 40 with more (csrc/row_products.h)
ROWS = [1, 5, 19, 20, 39, 40, 64]
PATHS = ["measured", "blas", "own"]
DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32")]


def tolerance(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)


def run(path, threads, fn, *args, **kwargs):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if path == "own":
            with _extension.own_row_products():
                assert not _extension.blas_in_use(torch.float32)
                return fn(*args, **kwargs)
        if path == "blas":
            _extension._C.set_blas_min_rows(1)
        return fn(*args, **kwargs)
    finally:
        _extension._C.set_blas_min_rows(-1)
        torch.set_num_threads(before)


def layer_norm(t, weight, bias):
    mean = t.mean(-1, keepdim=True)
    var = ((t - mean) ** 2).mean(-1, keepdim=True)
    return (t - mean) / torch.sqrt(var + 1e-5) * weight + bias


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_equals_the_formula(path, threads, rows, dtype):
    g = torch.Generator().manual_seed(rows)
    D, K = 48, 72
    # strided rows: x and inputs are column slices of wider tensors
    x = torch.randn(rows, D + 5, generator=g, dtype=dtype)[:, 2 : 2 + D]
    a = torch.randn(rows, K + 3, generator=g, dtype=dtype)[:, :K]
    w, b = torch.randn(D, K, generator=g, dtype=dtype), torch.randn(D, generator=g, dtype=dtype)
    nw, nb = torch.randn(D, generator=g, dtype=dtype), torch.randn(D, generator=g, dtype=dtype)
    y = run(path, threads, residual_linear, x, a, w, b, nw, nb, norm=True)
    expected = layer_norm(x.double() + a.double() @ w.double().T + b.double(), nw, nb)
    assert_close("y", y.double(), expected.double(), **tolerance(dtype))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [3, 20, 40])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu", "gelu", "geglu"])
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
@pytest.mark.parametrize("biases", [True, False], ids=["biases", "no-biases"])
def test_feed_forward_equals_the_formula(
    path, threads, rows, dtype, activation, norm_first, biases
):
    g = torch.Generator().manual_seed(rows)
    D, hidden = 40, 56
    first = 2 * hidden if activation == "geglu" else hidden
    x = torch.randn(rows, D + 8, generator=g, dtype=dtype)[:, 8:]  # strided rows
    w1 = torch.randn(first, D, generator=g, dtype=dtype) / D**0.5
    b1 = torch.randn(first, generator=g, dtype=dtype)
    w2 = torch.randn(D, hidden, generator=g, dtype=dtype) / hidden**0.5
    b2, nw, nb = (torch.randn(D, generator=g, dtype=dtype) for _ in range(3))
    if not biases:
        b1, b2 = torch.zeros_like(b1), torch.zeros_like(b2)  # the formula's terms
    passed = (b1, b2) if biases else (None, None)
    y = run(
        path, threads, residual_feed_forward, x, w1, passed[0], w2, passed[1], nw, nb,
        activation=activation, norm_first=norm_first,
    )  # fmt: skip
    xd = x.double()
    h = (layer_norm(xd, nw, nb) if norm_first else xd) @ w1.double().T + b1
    if activation == "geglu":
        h = h[:, :hidden] * F.gelu(h[:, hidden:])
    else:
        h = F.relu(h) if activation == "relu" else F.gelu(h)
    expected = xd + h @ w2.double().T + b2
    if not norm_first:
        expected = layer_norm(expected, nw, nb)
    assert_close("y", y.double(), expected.double(), **tolerance(dtype))


@needs_blas
@pytest.mark.parametrize(
    "threads, rows, min_rows", [(1, 20, -1), (1, 64, -1), (2, 40, -1), (2, 64, -1), (2, 4, 1)]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_blas_path_is_torch_mm(threads, rows, min_rows, dtype):
    """From the switch on, a product is torch.mm's own gemm: bit for bit the same result."""
    if not _extension.blas_in_use(dtype):
        pytest.skip(f"no BLAS for {dtype}")
    g = torch.Generator().manual_seed(threads)
    a = torch.randn(rows, 384, generator=g, dtype=dtype)
    w = torch.randn(1536, 384, generator=g, dtype=dtype)
    zeros = torch.zeros(rows, 1536, dtype=dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _extension._C.set_blas_min_rows(min_rows)
        y = residual_linear(zeros, a, w)
        expected = torch.mm(a, w.T)
    finally:
        _extension._C.set_blas_min_rows(-1)
        torch.set_num_threads(before)
    assert torch.equal(y, expected)


def mkl_max_threads():
    """torch's MKL's own thread count, or None when torch's library exports no such function."""
    name = "libtorch_cpu.so"
    path = os.path.join(os.path.dirname(torch.__file__), "lib", name)
    try:
        library = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | os.RTLD_LAZY)
        function = library.mkl_get_max_threads
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_int
    return function()


@needs_blas
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_blas_threads_follow_torch_set_num_threads(threads):
    if mkl_max_threads() is None:
        pytest.skip("torch's BLAS is not MKL")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        assert mkl_max_threads() == threads
    finally:
        torch.set_num_threads(before)


GEMM = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 13), ctypes.c_size_t, ctypes.c_size_t)


def test_a_function_that_fails_the_check_is_not_used():
    """A gemm that computes nothing is rejected at installation; the own kernels run."""

    @GEMM
    def wrong(*args):
        return None

    try:
        assert not _extension._C.install_blas_f32(ctypes.cast(wrong, ctypes.c_void_p).value)
        a, w = torch.randn(64, 16), torch.randn(8, 16)
        y = residual_linear(torch.zeros(64, 8), a, w)
        assert_close("y", y, a @ w.T)
    finally:
        _extension._install_blas()
    assert _extension.blas_in_use(torch.float32) == (_extension._torch_gemm_addresses()[0] != 0)


def test_without_blas_nothing_is_installed():
    assert not _extension._C.install_blas_f32(0)
    assert not _extension._C.install_blas_f64(0)
    _extension._install_blas()
