"""The compiled extension ``attention_core._C`` and the choice between kernels and references.

Every op package (``causal_product``, ``local_product``, ``sparse_product``, ``aggregate``,
``hashing``, ``clustering.hamming``) registers its own ``torch.library`` ops; this module only
loads the extension (after torch, so that the extension's OpenMP symbols resolve to torch's
own ``libgomp.so.1``), says whether the kernels should run, and turns tensors into the
addresses and strides the raw-pointer bindings take.

The few-row dense products of the compiled kernels (``csrc/row_products.h``) run on the BLAS
that torch itself calls for ``torch.mm`` (MKL's ``sgemm_``/``dgemm_`` in the Linux x86-64
wheels), found here in the torch library already loaded: no link dependency of the extension,
the same OpenMP pool and thread count as torch. Where torch exports no such function the
kernels keep their own products (``csrc/blas.h``).

Set the environment variable ``ATTENTION_CORE_FORCE_REFERENCE=1`` to force the
plain-PyTorch path everywhere (useful to tell a kernel bug from a model bug).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from ._checks import PLAIN_TENSORS

try:  # torch is imported first: the extension links to the libgomp.so.1 torch has loaded
    from . import _C
except ImportError:  # a source checkout that was never compiled
    _C = None  # type: ignore[assignment]  # every caller checks `require_extension()` first

__all__ = [
    "FORCE_REFERENCE_ENV",
    "address",
    "binding",
    "blas_in_use",
    "kernels_available",
    "needs_graph",
    "new_nhl",
    "nhl",
    "own_row_products",
    "require_extension",
    "row_major",
    "triton_available",
    "triton_installed",
    "use_kernels",
]

FORCE_REFERENCE_ENV = "ATTENTION_CORE_FORCE_REFERENCE"

# torch's CPU library by platform (Windows is left out: its BLAS symbols are not checked here)
_TORCH_CPU_LIBRARY = {"linux": "libtorch_cpu.so", "darwin": "libtorch_cpu.dylib"}

_CPU_DTYPES = (torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernels_available() -> bool:
    """``True`` when the compiled extension ``attention_core._C`` could be imported."""
    return _C is not None


def triton_installed() -> bool:
    """``True`` when a ``triton`` package is installed.

    Found without importing it, so that importing attention_core does not pay for importing triton.
    """
    return importlib.util.find_spec("triton") is not None


@functools.cache
def triton_available() -> bool:
    """``True`` when ``triton`` (and ``triton.language``) can be imported."""
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails while importing
        return False
    return True


# ``os.environ.get`` encodes the key and decodes the value at every call (about 1 us, paid by
# every kernel call of a recurrent step); CPython's ``os.environ`` keeps the encoded mapping
# it updates in ``_data``, read here directly where it exists
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENVIRON_KEY = getattr(os.environ, "encodekey", lambda key: key)(FORCE_REFERENCE_ENV)


def _reference_forced() -> bool:
    """``True`` when ``ATTENTION_CORE_FORCE_REFERENCE`` is set to anything but ``""``/``"0"``."""
    if isinstance(_ENVIRON_DATA, dict):
        raw = _ENVIRON_DATA.get(_ENVIRON_KEY)
        return raw is not None and raw not in (b"", b"0", "", "0")
    return os.environ.get(FORCE_REFERENCE_ENV, "0") not in ("", "0")


def use_kernels(*tensors: Tensor, triton: bool = False) -> bool:
    """``True`` when the compiled kernels should handle ``tensors``.

    That is when the extension is available, ``ATTENTION_CORE_FORCE_REFERENCE`` is unset (or
    ``"0"``), and every tensor is a float32/float64 CPU tensor. With ``triton=True`` (ops with a
    Triton kernel registered for ``"cuda"``), float32/float16/bfloat16 CUDA tensors also qualify
    when triton is importable; float64 CUDA tensors do not (they take the plain-PyTorch path)."""
    if _reference_forced():
        return False
    if triton and tensors and all(t.device.type == "cuda" for t in tensors):
        return triton_available() and all(t.dtype in _TRITON_DTYPES for t in tensors)
    if _C is None:
        return False
    for t in tensors:  # noqa: SIM110  # all(generator) costs more, at every kernel call
        if t.device.type != "cpu" or t.dtype not in _CPU_DTYPES:
            return False
    return True


def direct_call_mode() -> bool:
    """Nothing records gradients, ``torch.compile`` traces nothing and the reference is not
    forced: a prepared op's fast path may call the kernel directly."""
    return (
        not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not _reference_forced()
    )


def needs_graph(*tensors: Tensor | None) -> bool:
    """Whether a call must go through its registered ``torch.library`` op: under
    ``torch.compile``, or when autograd records it (grad mode on and a tensor that requires
    grad). Otherwise a public function that has checked its arguments may call the op's CPU
    kernel directly and skip the dispatcher (tens of microseconds per call). Tensor
    subclasses other than ``nn.Parameter`` always take the op."""
    if torch.compiler.is_compiling():
        return True
    if any(t is not None and type(t) not in PLAIN_TENSORS for t in tensors):
        return True  # a tensor subclass (fake, functional, ...) dispatches through the op
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def require_extension() -> None:
    """Raise when the compiled extension is missing (a CPU op was called without it)."""
    if _C is None:
        raise RuntimeError("attention_core._C is not compiled; use the reference path")


# the functions `binding` has looked up, valid for the module they came from (tests replace
# `_C` with a spy)
_BINDINGS: dict[tuple[str, torch.dtype], Callable[..., None]] = {}
_BINDINGS_SOURCE: list[object] = [None]


def binding(name: str, dtype: torch.dtype) -> Callable[..., None]:
    """The ``_C`` function ``name`` for ``dtype`` (``name_f32`` or ``name_f64``)."""
    if _BINDINGS_SOURCE[0] is not _C:
        _BINDINGS.clear()
        _BINDINGS_SOURCE[0] = _C
    function = _BINDINGS.get((name, dtype))
    if function is None:
        require_extension()
        function = getattr(_C, f"{name}_{'f32' if dtype == torch.float32 else 'f64'}")
        _BINDINGS[name, dtype] = function
    return function


def row_major(t: Tensor) -> Tensor:
    """``t`` with a contiguous last dimension (a copy only when it is not)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def address(t: Tensor | None) -> int:
    """The data address of ``t``, ``0`` for ``None``."""
    return 0 if t is None else t.data_ptr()


def nhl(t: Tensor) -> tuple[int, int, int]:
    """The element strides of the first three dimensions of ``t``."""
    return (t.stride(0), t.stride(1), t.stride(2))


def new_nhl(like: Tensor, N: int, H: int, L: int, D: int, sequence_first: bool) -> Tensor:
    """An uninitialised ``(N, H, L, D)`` tensor, stored as ``(N, L, H, D)`` if sequence_first."""
    if sequence_first:
        return like.new_empty(N, L, H, D).transpose(1, 2)
    return like.new_empty(N, H, L, D)


def _torch_gemm_addresses() -> tuple[int, int]:
    """The addresses of ``sgemm_`` and ``dgemm_`` exported by the torch library already
    loaded; ``0`` for each one that is absent (another build or platform)."""
    name = _TORCH_CPU_LIBRARY.get("darwin" if sys.platform == "darwin" else sys.platform[:5])
    if name is None:
        return 0, 0
    path = os.path.join(os.path.dirname(torch.__file__), "lib", name)
    # RTLD_NOLOAD: only the copy torch has loaded, never a second one
    mode = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 0)
    try:
        library = ctypes.CDLL(path, mode=mode)
    except OSError:
        return 0, 0
    addresses = []
    for symbol in ("sgemm_", "dgemm_"):
        function = getattr(library, symbol, None)
        addresses.append(0 if function is None else ctypes.cast(function, ctypes.c_void_p).value)
    return addresses[0] or 0, addresses[1] or 0


_BLAS_IN_USE = {torch.float32: False, torch.float64: False}


def _install_blas(enabled: bool = True) -> None:
    """Hand torch's gemm functions to the extension (``enabled=False``: none)."""
    sgemm, dgemm = _torch_gemm_addresses() if enabled else (0, 0)
    _BLAS_IN_USE[torch.float32] = bool(_C.install_blas_f32(sgemm))
    _BLAS_IN_USE[torch.float64] = bool(_C.install_blas_f64(dgemm))


def blas_in_use(dtype: torch.dtype) -> bool:
    """``True`` when the kernels' few-row products of ``dtype`` run on torch's BLAS."""
    return _BLAS_IN_USE.get(dtype, False)


@contextlib.contextmanager
def own_row_products() -> Iterator[None]:
    """Run the kernels' few-row products on their own code inside the block, not on torch's
    BLAS (tests and benchmarks compare the two)."""
    require_extension()
    _install_blas(False)
    try:
        yield
    finally:
        _install_blas()


if _C is not None:
    _install_blas()
