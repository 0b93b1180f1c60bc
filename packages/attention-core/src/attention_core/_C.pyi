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
    elu: bool = False,
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
    elu: bool = False,
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
    elu: bool = False,
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
    elu: bool = False,
) -> None: ...
def local_dot_product_forward_f32(
    q: int,
    q_strides: Strides,
    k: int,
    k_strides: Strides,
    mask: int,
    mask_strides: tuple[int, int],
    lengths: int,
    out: int,
    out_strides: Strides,
    N: int,
    H: int,
    L: int,
    S: int,
    F: int,
    C: int,
    threads: int,
) -> None: ...
def local_dot_product_backward_f32(
    grad: int,
    grad_strides: Strides,
    q: int,
    q_strides: Strides,
    k: int,
    k_strides: Strides,
    lengths: int,
    dq: int,
    dq_strides: Strides,
    dk: int,
    dk_strides: Strides,
    N: int,
    H: int,
    L: int,
    S: int,
    F: int,
    C: int,
    threads: int,
) -> None: ...
def local_weighted_average_forward_f32(
    attention: int,
    attention_strides: Strides,
    v: int,
    v_strides: Strides,
    out: int,
    out_strides: Strides,
    N: int,
    H: int,
    L: int,
    S: int,
    F: int,
    C: int,
    threads: int,
) -> None: ...
def local_weighted_average_backward_f32(
    grad: int,
    grad_strides: Strides,
    attention: int,
    attention_strides: Strides,
    v: int,
    v_strides: Strides,
    dattention: int,
    dattention_strides: Strides,
    dv: int,
    dv_strides: Strides,
    N: int,
    H: int,
    L: int,
    S: int,
    F: int,
    C: int,
    threads: int,
) -> None: ...
def local_dot_product_forward_f64(
    q: int,
    q_strides: Strides,
    k: int,
    k_strides: Strides,
    mask: int,
    mask_strides: tuple[int, int],
    lengths: int,
    out: int,
    out_strides: Strides,
    N: int,
    H: int,
    L: int,
    S: int,
    F: int,
    C: int,
    threads: int,
) -> None: ...
def local_dot_product_backward_f64(
    grad: int,
    grad_strides: Strides,
    q: int,
    q_strides: Strides,
    k: int,
    k_strides: Strides,
    lengths: int,
    dq: int,
    dq_strides: Strides,
    dk: int,
    dk_strides: Strides,
    N: int,
    H: int,
    L: int,
    S: int,
    F: int,
    C: int,
    threads: int,
) -> None: ...
def local_weighted_average_forward_f64(
    attention: int,
    attention_strides: Strides,
    v: int,
    v_strides: Strides,
    out: int,
    out_strides: Strides,
    N: int,
    H: int,
    L: int,
    S: int,
    F: int,
    C: int,
    threads: int,
) -> None: ...
def local_weighted_average_backward_f64(
    grad: int,
    grad_strides: Strides,
    attention: int,
    attention_strides: Strides,
    v: int,
    v_strides: Strides,
    dattention: int,
    dattention_strides: Strides,
    dv: int,
    dv_strides: Strides,
    N: int,
    H: int,
    L: int,
    S: int,
    F: int,
    C: int,
    threads: int,
) -> None: ...
def sparse_dot_product_forward_f32(
    q: int,
    q_strides: Strides,
    keys: int,
    keys_strides: Strides,
    out: int,
    out_strides: Strides,
    topk: int,
    R: int,
    groups: int,
    limits: int,
    N: int,
    H: int,
    L: int,
    S: int,
    F: int,
    k: int,
    threads: int,
) -> None: ...
def sparse_dot_product_backward_f32(
    grad: int,
    grad_strides: Strides,
    q: int,
    q_strides: Strides,
    keys: int,
    keys_strides: Strides,
    dq: int,
    dq_strides: Strides,
    dkeys: int,
    dkeys_strides: Strides,
    topk: int,
    R: int,
    groups: int,
    limits: int,
    N: int,
    H: int,
    L: int,
    S: int,
    F: int,
    k: int,
    threads: int,
) -> None: ...
def sparse_weighted_average_forward_f32(
    weights: int,
    weights_strides: Strides,
    values: int,
    values_strides: Strides,
    out: int,
    out_strides: Strides,
    topk: int,
    R: int,
    groups: int,
    limits: int,
    N: int,
    H: int,
    L: int,
    S: int,
    F: int,
    k: int,
    threads: int,
) -> None: ...
def sparse_weighted_average_backward_f32(
    grad: int,
    grad_strides: Strides,
    weights: int,
    weights_strides: Strides,
    values: int,
    values_strides: Strides,
    dweights: int,
    dweights_strides: Strides,
    dvalues: int,
    dvalues_strides: Strides,
    topk: int,
    R: int,
    groups: int,
    limits: int,
    N: int,
    H: int,
    L: int,
    S: int,
    F: int,
    k: int,
    threads: int,
) -> None: ...
def sparse_dot_product_forward_f64(
    q: int,
    q_strides: Strides,
    keys: int,
    keys_strides: Strides,
    out: int,
    out_strides: Strides,
    topk: int,
    R: int,
    groups: int,
    limits: int,
    N: int,
    H: int,
    L: int,
    S: int,
    F: int,
    k: int,
    threads: int,
) -> None: ...
def sparse_dot_product_backward_f64(
    grad: int,
    grad_strides: Strides,
    q: int,
    q_strides: Strides,
    keys: int,
    keys_strides: Strides,
    dq: int,
    dq_strides: Strides,
    dkeys: int,
    dkeys_strides: Strides,
    topk: int,
    R: int,
    groups: int,
    limits: int,
    N: int,
    H: int,
    L: int,
    S: int,
    F: int,
    k: int,
    threads: int,
) -> None: ...
def sparse_weighted_average_forward_f64(
    weights: int,
    weights_strides: Strides,
    values: int,
    values_strides: Strides,
    out: int,
    out_strides: Strides,
    topk: int,
    R: int,
    groups: int,
    limits: int,
    N: int,
    H: int,
    L: int,
    S: int,
    F: int,
    k: int,
    threads: int,
) -> None: ...
def sparse_weighted_average_backward_f64(
    grad: int,
    grad_strides: Strides,
    weights: int,
    weights_strides: Strides,
    values: int,
    values_strides: Strides,
    dweights: int,
    dweights_strides: Strides,
    dvalues: int,
    dvalues_strides: Strides,
    topk: int,
    R: int,
    groups: int,
    limits: int,
    N: int,
    H: int,
    L: int,
    S: int,
    F: int,
    k: int,
    threads: int,
) -> None: ...
def group_rows_f32(
    input: int,
    input_strides: Strides,
    output: int,
    output_strides: Strides,
    G: int,
    F: int,
    limits: int,
    N: int,
    H: int,
    L: int,
    C: int,
    E: int,
    broadcast: bool,
    threads: int,
) -> None:
    """Aggregate (broadcast=False) or broadcast (True) rows by group."""

def group_rows_f64(
    input: int,
    input_strides: Strides,
    output: int,
    output_strides: Strides,
    G: int,
    F: int,
    limits: int,
    N: int,
    H: int,
    L: int,
    C: int,
    E: int,
    broadcast: bool,
    threads: int,
) -> None:
    """Aggregate (broadcast=False) or broadcast (True) rows by group."""

def hamming_cluster(
    hashes: int,
    lengths: int,
    groups: int,
    counts: int,
    centroids: int,
    distances: int,
    bitcounts: int,
    N: int,
    H: int,
    L: int,
    C: int,
    bits: int,
    iterations: int,
    threads: int,
) -> None: ...
def causal_form(L: int, E: int, M: int, compact: bool, elu: bool) -> str:
    """The form of the causal product for a shape: "recurrence", "packed" or "chunked"."""

def chunked_thresholds() -> tuple[int, int, int]:
    """``(min_length, min_state_compact, min_state_strided)`` of the chunked form."""

def set_chunked_thresholds(min_length: int, min_state_compact: int, min_state_strided: int) -> None:
    """Set the thresholds of the chunked form (for tests)."""

def elu_plus_one_f32(x: int, out: int, n: int) -> None:
    """``out[i] = elu(x[i]) + 1`` for ``i < n`` with the current CPU level's variant."""

def elu_plus_one_f64(x: int, out: int, n: int) -> None:
    """``out[i] = elu(x[i]) + 1`` for ``i < n`` with the current CPU level's variant."""

def cpu_level() -> int:
    """Instruction set in use: 0 baseline, 1 AVX2+FMA, 2 AVX-512."""

def set_cpu_level(level: int) -> None:
    """Cap the instruction set (-1: automatic); for tests and benchmarks."""

def install_blas_f32(sgemm: int) -> bool:
    """Run few-row float32 products on the Fortran ``sgemm_`` at this address (0: the own
    kernels); returns whether it passed its check and is in use."""

def install_blas_f64(dgemm: int) -> bool:
    """Run few-row float64 products on the Fortran ``dgemm_`` at this address (0: the own
    kernels); returns whether it passed its check and is in use."""

def set_blas_min_rows(rows: int) -> None:
    """Run few-row products of this many rows or more on BLAS, fewer on the own kernels (-1:
    the measured thresholds); for tests and benchmarks."""

def openmp_enabled() -> bool:
    """Whether the kernels were compiled with OpenMP (otherwise they run serially)."""

def last_team_size() -> int:
    """Threads (the OpenMP team) that ran the last kernel's parallel loop; for tests."""

def linear_attention_step_f32(
    q: int,
    q_strides: tuple[int, int],
    k: int,
    k_strides: tuple[int, int],
    v: int,
    v_strides: tuple[int, int],
    S: int,
    Z: int,
    out: int,
    S_new: int,
    Z_new: int,
    N: int,
    H: int,
    E: int,
    M: int,
    eps: float,
    elu: bool,
    threads: int,
) -> None:
    """One recurrent linear-attention step over float32 buffers (csrc/linear_step.h): q, k, v
    ``(N, H, E|M)`` with the strides of n and h, S ``(N, H, E, M)`` and Z ``(N, H, E)``
    contiguous or 0 for zeros; writes out ``(N, H, M)``, S_new and Z_new."""

def linear_attention_step_f64(
    q: int,
    q_strides: tuple[int, int],
    k: int,
    k_strides: tuple[int, int],
    v: int,
    v_strides: tuple[int, int],
    S: int,
    Z: int,
    out: int,
    S_new: int,
    Z_new: int,
    N: int,
    H: int,
    E: int,
    M: int,
    eps: float,
    elu: bool,
    threads: int,
) -> None:
    """float64 version of `linear_attention_step_f32`."""

def residual_feed_forward_f32(
    x: int,
    ldx: int,
    R: int,
    D: int,
    F: int,
    W1: int,
    b1: int,
    W2: int,
    b2: int,
    norm_weight: int,
    norm_bias: int,
    eps: float,
    activation: int,
    norm_first: bool,
    out: int,
    threads: int,
) -> None:
    """A feed-forward sublayer on R rows of float32 buffers (csrc/residual_step.h): x
    ``(R, D)`` rows ``ldx`` apart, W1 ``(F or 2 F, D)``, W2 ``(D, F)`` contiguous, biases and
    norm parameters or 0; activation 0 relu, 1 gelu, 2 geglu; writes out ``(R, D)``."""

def residual_feed_forward_f64(
    x: int,
    ldx: int,
    R: int,
    D: int,
    F: int,
    W1: int,
    b1: int,
    W2: int,
    b2: int,
    norm_weight: int,
    norm_bias: int,
    eps: float,
    activation: int,
    norm_first: bool,
    out: int,
    threads: int,
) -> None:
    """float64 version of `residual_feed_forward_f32`."""

def residual_linear_f32(
    x: int,
    ldx: int,
    a: int,
    lda: int,
    R: int,
    D: int,
    K: int,
    W: int,
    b: int,
    norm: bool,
    norm_weight: int,
    norm_bias: int,
    eps: float,
    out: int,
    threads: int,
) -> None:
    """``x + a W^T + b`` (then a layer norm when ``norm``) on R rows of float32 buffers
    (csrc/residual_step.h); writes out ``(R, D)``."""

def residual_linear_f64(
    x: int,
    ldx: int,
    a: int,
    lda: int,
    R: int,
    D: int,
    K: int,
    W: int,
    b: int,
    norm: bool,
    norm_weight: int,
    norm_bias: int,
    eps: float,
    out: int,
    threads: int,
) -> None:
    """float64 version of `residual_linear_f32`."""

def cache_attention_f32(
    q: int,
    q_strides: tuple[int, int, int],
    k: int,
    k_strides: tuple[int, int, int, int],
    v: int,
    v_strides: tuple[int, int, int],
    bias: int,
    bias_strides: tuple[int, int, int],
    out: int,
    sizes: tuple[int, int, int, int, int, int],
    start: int,
    end: int,
    scale: float,
    threads: int,
) -> None:
    """Softmax attention of query rows ``(B, W, H, E)`` over cache positions start .. end - 1
    of keys ``(B, H, C, E)`` and values ``(B, H, C, M)`` (float32 buffers,
    csrc/cache_attention.h), bias ``(B, H, W, J)`` strides or 0; sizes ``(B, W, H, E, M, C)``;
    writes out ``(B, W, H, M)``."""

def cache_attention_f64(
    q: int,
    q_strides: tuple[int, int, int],
    k: int,
    k_strides: tuple[int, int, int, int],
    v: int,
    v_strides: tuple[int, int, int],
    bias: int,
    bias_strides: tuple[int, int, int],
    out: int,
    sizes: tuple[int, int, int, int, int, int],
    start: int,
    end: int,
    scale: float,
    threads: int,
) -> None:
    """float64 version of `cache_attention_f32`."""

def step_chain_f32(
    program: int,
    length: int,
    bases: list[int],
    scalars: list[float],
    indices: list[int],
    threads: int,
) -> None:
    """Run a chain of step ops on float32 buffers (csrc/step_chain.h): the int64 ``program``
    (address, ``length`` elements) holds per op its kind (0 linear, 1 feed forward, 2 linear
    attention step, 3 layer norm, 4 weighted sum, 5 cache attention, 6 cache write) and its
    fields, each address as ``(base index, element offset)`` into ``bases`` (base -1: null),
    each position as an index into ``indices``; ``scalars`` one eps or scale per op
    (csrc/step_chain_bindings.h)."""

def step_chain_f64(
    program: int,
    length: int,
    bases: list[int],
    scalars: list[float],
    indices: list[int],
    threads: int,
) -> None:
    """float64 version of `step_chain_f32`."""
