"""Type stubs of the compiled extension (private: use attention_core's Python modules).

Every function takes the addresses (``tensor.data_ptr()``) of CPU buffers and their sizes; a
strided operand also takes the element strides of its first three dimensions (its last
dimension must be contiguous). The Python callers validate shapes, dtypes and devices before
calling; the functions release the GIL and raise ValueError on bad sizes or null buffers.
"""

Strides = tuple[int, int, int]

def compute_hashes_f32(X: int, planes: int, hashes: int, n: int, d: int, bits: int) -> None: ...
def compute_hashes_f64(X: int, planes: int, hashes: int, n: int, d: int, bits: int) -> None: ...
def causal_product_forward_f32(
    q: int,
    q_strides: Strides,
    k: int,
    k_strides: Strides,
    v: int,
    v_strides: Strides,
    out: int,
    out_strides: Strides,
    S0: int,
    z0: int,
    S: int,
    z: int,
    N: int,
    H: int,
    L: int,
    E: int,
    M: int,
    normalize: bool,
    eps: float,
    threads: int,
) -> None: ...
def causal_product_forward_f64(
    q: int,
    q_strides: Strides,
    k: int,
    k_strides: Strides,
    v: int,
    v_strides: Strides,
    out: int,
    out_strides: Strides,
    S0: int,
    z0: int,
    S: int,
    z: int,
    N: int,
    H: int,
    L: int,
    E: int,
    M: int,
    normalize: bool,
    eps: float,
    threads: int,
) -> None: ...
def causal_product_backward_f32(
    grad: int,
    grad_strides: Strides,
    q: int,
    q_strides: Strides,
    k: int,
    k_strides: Strides,
    v: int,
    v_strides: Strides,
    out: int,
    out_strides: Strides,
    S0: int,
    z0: int,
    gS: int,
    gz: int,
    dq: int,
    dq_strides: Strides,
    dk: int,
    dk_strides: Strides,
    dv: int,
    dv_strides: Strides,
    dS0: int,
    dz0: int,
    N: int,
    H: int,
    L: int,
    E: int,
    M: int,
    normalize: bool,
    eps: float,
    threads: int,
) -> None: ...
def causal_product_backward_f64(
    grad: int,
    grad_strides: Strides,
    q: int,
    q_strides: Strides,
    k: int,
    k_strides: Strides,
    v: int,
    v_strides: Strides,
    out: int,
    out_strides: Strides,
    S0: int,
    z0: int,
    gS: int,
    gz: int,
    dq: int,
    dq_strides: Strides,
    dk: int,
    dk_strides: Strides,
    dv: int,
    dv_strides: Strides,
    dS0: int,
    dz0: int,
    N: int,
    H: int,
    L: int,
    E: int,
    M: int,
    normalize: bool,
    eps: float,
    threads: int,
) -> None: ...
def cpu_level() -> int:
    """Instruction set in use: 0 baseline, 1 AVX2+FMA, 2 AVX-512."""

def set_cpu_level(level: int) -> None:
    """Cap the instruction set (-1: automatic); for tests and benchmarks."""
