"""Every public op and function checks every argument before a kernel runs (DESIGN.md
"Validate once, completely"): property tests call each one with a wrong rank, a wrong size
of a dimension tied to another argument, a wrong dtype, another device ('meta'), views and
out-of-range indices. Wrong inputs raise an error that names the argument, says what was
expected and what it got; views and tolerated index values give the contiguous results.

The property tests run in a subprocess (``test_properties_in_a_subprocess``), so that a crash
fails one test instead of killing the run; ``nox -s asan`` runs them under AddressSanitizer.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attention_core import _extension
from attention_core.aggregate import aggregate, broadcast, clustered_aggregate
from attention_core.causal_product import (
    causal_dot_product,
    elu_normalized_causal_dot_product,
    normalized_causal_dot_product,
)
from attention_core.clustering.hamming import cluster
from attention_core.hashing import compute_hashes
from attention_core.linear_step import linear_attention_step
from attention_core.local_product import local_dot_product, local_weighted_average
from attention_core.sparse_product import (
    clustered_sparse_dot_product,
    sparse_dot_product,
    sparse_weighted_average,
)

IN_SUBPROCESS = os.environ.get("ATTENTION_CORE_VALIDATION_RUN") == "1"
needs_kernels = pytest.mark.skipif(
    not _extension.kernels_available(), reason="attention_core._C is not compiled"
)
property_test = pytest.mark.skipif(
    not IN_SUBPROCESS, reason="runs in the subprocess of test_properties_in_a_subprocess"
)
ERRORS = (TypeError, ValueError)


@pytest.mark.skipif(IN_SUBPROCESS, reason="this is the subprocess")
def test_properties_in_a_subprocess():
    """Run this module's property tests in a fresh interpreter: a crash (a signal) fails this
    test instead of killing the whole run."""
    env = {**os.environ, "ATTENTION_CORE_VALIDATION_RUN": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


# ---------------------------------------------------------------------------------------
# the arguments of every op, described by named dimensions
# ---------------------------------------------------------------------------------------


@dataclass
class Arg:
    """A tensor argument: its dimensions by name, and its kind ('float', 'index' for int64
    indices and lengths, 'hash' for int64 data)."""

    name: str
    dims: str
    kind: str = "float"


@dataclass
class Spec:
    """A callable with tensor arguments ``args`` (in order, then the ``extra`` positional
    values computed from the sizes) and the named dimensions tied to an int argument."""

    name: str
    call: object
    args: list[Arg]
    extra: object = None  # sizes -> extra positional arguments after the tensors
    tied: set[str] = field(default_factory=set)  # dims also fixed by a non-tensor argument
    kernel: bool = True  # a torch.ops op (needs the compiled extension)


def op(name):
    return getattr(torch.ops.attention_core, name)


CAUSAL = [Arg("Q", "N H L E"), Arg("K", "N H L E"), Arg("V", "N H L M")]
STATES = [Arg("S0", "N H E M"), Arg("z0", "N H E")]
STATE_GRADS = [Arg("grad_S", "N H E M"), Arg("grad_z", "N H E")]
LOCAL_QK = [Arg("Q", "N H L E"), Arg("K", "N H S E")]
LOCAL_AV = [Arg("attention", "N H L C"), Arg("V", "N H S D")]
SPARSE_AVERAGE = [Arg("weights", "N H L k"), Arg("values", "N H S D")]
SPARSE_INDEX = [Arg("topk", "N H R k", "topk"), Arg("groups", "N H L", "group")]
LIMITS = [Arg("limits", "N H", "index")]
CLUSTERS = [
    Arg("groups", "N H L", "group"),
    Arg("counts", "N H R", "index"),
    Arg("lengths", "N", "index"),
]
GROUPS = [Arg("G", "N H L", "group"), Arg("F", "N H C")]
LINEAR_STEP = [
    Arg("query", "N H E"),
    Arg("key", "N H E"),
    Arg("value", "N H M"),
    Arg("S", "N H E M"),
    Arg("Z", "N H E"),
]

SPECS = [
    Spec(
        "causal_product_forward",
        op("causal_product_forward"),
        CAUSAL + STATES,
        lambda s: (True, 1e-6, False),
    ),
    Spec(
        "causal_product_backward",
        op("causal_product_backward"),
        [Arg("grad", "N H L M"), *CAUSAL, Arg("out", "N H L M"), *STATES, *STATE_GRADS],
        lambda s: (True, 1e-6, False),
    ),
    Spec(
        "elu_causal_linear_attention",
        op("elu_causal_linear_attention"),
        CAUSAL,
        lambda s: (1e-6, False),
    ),
    Spec(
        "elu_causal_linear_attention_backward",
        op("elu_causal_linear_attention_backward"),
        [Arg("grad", "N H L M"), *CAUSAL, Arg("out", "N H L M")],
        lambda s: (1e-6, False),
    ),
    Spec(
        "local_dot_product_forward",
        op("local_dot_product_forward"),
        [*LOCAL_QK, Arg("attn_mask", "L S"), Arg("key_lengths", "N", "index")],
        lambda s: (s["C"],),
    ),
    Spec(
        "local_dot_product_backward",
        op("local_dot_product_backward"),
        [Arg("grad", "N H L C"), *LOCAL_QK, Arg("key_lengths", "N", "index")],
        lambda s: (s["C"],),
        tied={"C"},
    ),
    Spec("local_weighted_average_forward", op("local_weighted_average_forward"), LOCAL_AV),
    Spec(
        "local_weighted_average_backward",
        op("local_weighted_average_backward"),
        [Arg("grad", "N H L D"), *LOCAL_AV],
    ),
    Spec(
        "sparse_dot_product_forward",
        op("sparse_dot_product_forward"),
        [Arg("Q", "N H L E"), Arg("K", "N H S E"), *SPARSE_INDEX, *LIMITS],
    ),
    Spec(
        "sparse_dot_product_backward",
        op("sparse_dot_product_backward"),
        [Arg("grad", "N H L k"), Arg("Q", "N H L E"), Arg("K", "N H S E"), *SPARSE_INDEX, *LIMITS],
    ),
    Spec(
        "sparse_weighted_average_forward",
        op("sparse_weighted_average_forward"),
        [*SPARSE_AVERAGE, *SPARSE_INDEX, *LIMITS],
    ),
    Spec(
        "sparse_weighted_average_backward",
        op("sparse_weighted_average_backward"),
        [Arg("grad", "N H L D"), *SPARSE_AVERAGE, *SPARSE_INDEX, *LIMITS],
    ),
    Spec("linear_attention_step", op("linear_attention_step"), LINEAR_STEP, lambda s: (1e-6, True)),
    Spec("aggregate_forward", op("aggregate_forward"), [Arg("X", "N H L E"), *GROUPS, *LIMITS]),
    Spec(
        "aggregate_backward",
        op("aggregate_backward"),
        [Arg("grad", "N H C E"), Arg("X", "N H L E"), *GROUPS, *LIMITS],
    ),
    Spec("broadcast_forward", op("broadcast_forward"), [Arg("Y", "N H C E"), *GROUPS, *LIMITS]),
    Spec(
        "broadcast_backward",
        op("broadcast_backward"),
        [Arg("grad", "N H L E"), Arg("Y", "N H C E"), *GROUPS, *LIMITS],
    ),
    Spec(
        "compute_hashes",
        op("compute_hashes"),
        [Arg("X", "M D"), Arg("A", "B D1")],
        tied={"D", "D1"},
    ),
    Spec(
        "hamming_cluster",
        op("hamming_cluster"),
        [Arg("hashes", "N H L", "hash"), Arg("lengths", "N", "index")],
        lambda s: (s["C"], 2, 8),
    ),
    # the public functions
    Spec("causal_dot_product", causal_dot_product, CAUSAL, kernel=False),
    Spec("normalized_causal_dot_product", normalized_causal_dot_product, CAUSAL, kernel=False),
    Spec(
        "elu_normalized_causal_dot_product",
        elu_normalized_causal_dot_product,
        CAUSAL,
        kernel=False,
    ),
    Spec(
        "local_dot_product",
        local_dot_product,
        [
            Arg("queries", "N H L E"),
            Arg("keys", "N H S E"),
            Arg("attn_mask", "L S"),
            Arg("key_lengths", "N", "index"),
        ],
        lambda s: (s["C"],),
        kernel=False,
    ),
    Spec(
        "linear_attention_step",
        lambda query, key, value, S, Z: linear_attention_step(query, key, value, (S, Z)),
        LINEAR_STEP,
        kernel=False,
    ),
    Spec(
        "local_weighted_average",
        local_weighted_average,
        [Arg("attention", "N H L C"), Arg("values", "N H S D")],
        kernel=False,
    ),
    Spec(
        "sparse_dot_product",
        sparse_dot_product,
        [Arg("Q", "N H L E"), Arg("K", "N H S E"), Arg("topk", "N H L k", "topk")],
        kernel=False,
    ),
    Spec(
        "sparse_weighted_average",
        sparse_weighted_average,
        [Arg("weights", "N H L k"), Arg("values", "N H S D"), Arg("topk", "N H L k", "topk")],
        kernel=False,
    ),
    Spec(
        "clustered_sparse_dot_product",
        clustered_sparse_dot_product,
        [Arg("Q", "N H L E"), Arg("K", "N H S E"), Arg("topk", "N H R k", "topk"), *CLUSTERS],
        kernel=False,
    ),
    Spec("aggregate", aggregate, [Arg("X", "N H L E"), *GROUPS], kernel=False),
    Spec("broadcast", broadcast, [Arg("Y", "N H C E"), *GROUPS], kernel=False),
    Spec(
        "clustered_aggregate",
        clustered_aggregate,
        [Arg("X", "N H L E"), *GROUPS, Arg("lengths", "N", "index")],
        kernel=False,
    ),
    Spec(
        "compute_hashes",
        compute_hashes,
        [Arg("X", "M D"), Arg("A", "B D1")],
        tied={"D", "D1"},
        kernel=False,
    ),
    Spec(
        "cluster",
        lambda hashes, lengths: cluster(hashes, lengths, clusters=2, bits=8),
        [Arg("hashes", "N H L", "hash"), Arg("lengths", "N", "index")],
        kernel=False,
    ),
]
SPEC_IDS = [("op " if s.kernel else "") + s.name for s in SPECS]


def free_dims(spec: Spec) -> set[str]:
    """Dimensions that appear in one argument only (any size is valid)."""
    counts: dict[str, int] = {}
    for arg in spec.args:
        for d in arg.dims.split():
            counts[d] = counts.get(d, 0) + 1
    return {d for d, n in counts.items() if n == 1 and d not in spec.tied}


def sizes_strategy():
    small = st.integers(1, 4)
    return st.fixed_dictionaries(
        {
            "N": small, "H": small, "L": small, "S": small, "E": small, "M": small,
            "D": small, "C": st.integers(1, 3), "k": st.integers(1, 3), "R": st.integers(1, 3),
            "B": st.integers(1, 8), "seed": st.integers(0, 2**16),
        }
    )  # fmt: skip


def shape_of(arg: Arg, sizes: dict) -> tuple[int, ...]:
    dims = {**sizes, "D1": sizes["D"] + 1}
    return tuple(dims[d] for d in arg.dims.split())


def make_tensor(arg: Arg, sizes: dict, g: torch.Generator) -> torch.Tensor:
    shape = shape_of(arg, sizes)
    if arg.kind == "float":
        return torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
    if arg.kind == "topk":
        return torch.randint(0, sizes["S"], shape, generator=g)
    if arg.kind == "group":
        C = sizes["R"] if "R" in sizes and arg.name == "groups" else sizes["C"]
        return torch.randint(0, C, shape, generator=g)
    if arg.kind == "hash":
        return torch.randint(0, 256, shape, generator=g)
    upper = {"key_lengths": sizes["S"], "lengths": sizes["L"], "limits": sizes["L"]}
    return torch.randint(0, upper.get(arg.name, sizes["L"]) + 1, shape, generator=g)


def valid_call(spec: Spec, sizes: dict) -> list:
    g = torch.Generator().manual_seed(sizes["seed"])
    args = [make_tensor(arg, sizes, g) for arg in spec.args]
    if spec.extra is not None:
        args += list(spec.extra(sizes))
    return args


def run(spec: Spec, args: list):
    return spec.call(*args)


def flat(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for item in result for t in flat(item)]


def assert_names(error: Exception, arg: Arg) -> None:
    """The message names the argument (or the pair it belongs to), the expected and the got."""
    message = str(error)
    assert re.search(rf"(^|[^\w]){re.escape(arg.name)}([^\w]|$)", message), message
    assert "got" in message, message


def applicable(spec: Spec) -> bool:
    return _extension.kernels_available() or not spec.kernel


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------
# the properties
# ---------------------------------------------------------------------------------------


@property_test
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@SETTINGS
@given(sizes=sizes_strategy(), data=st.data())
def test_wrong_rank_is_named(spec, sizes, data):
    if not applicable(spec):
        pytest.skip("needs the compiled extension")
    args = valid_call(spec, sizes)
    i = data.draw(st.integers(0, len(spec.args) - 1))
    args[i] = args[i].unsqueeze(0)
    with pytest.raises(ERRORS) as error:
        run(spec, args)
    assert_names(error.value, spec.args[i])


@property_test
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@SETTINGS
@given(sizes=sizes_strategy(), data=st.data())
def test_wrong_tied_size_is_named(spec, sizes, data):
    if not applicable(spec):
        pytest.skip("needs the compiled extension")
    free = free_dims(spec)
    choices = [
        (i, j)
        for i, arg in enumerate(spec.args)
        for j, d in enumerate(arg.dims.split())
        if d not in free
    ]
    i, j = data.draw(st.sampled_from(choices))
    args = valid_call(spec, sizes)
    shape = list(args[i].shape)
    shape[j] += 1
    args[i] = torch.ones(shape, dtype=args[i].dtype)
    with pytest.raises(ERRORS) as error:
        run(spec, args)
    message = str(error.value)
    assert "got" in message, message
    # a mismatch between two arguments may be named by either of them
    names = [a.name for a in spec.args]
    assert any(re.search(rf"(^|[^\w]){re.escape(n)}([^\w]|$)", message) for n in names), message


@property_test
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@SETTINGS
@given(sizes=sizes_strategy(), data=st.data())
def test_wrong_dtype_is_named(spec, sizes, data):
    if not applicable(spec):
        pytest.skip("needs the compiled extension")
    args = valid_call(spec, sizes)
    i = data.draw(st.integers(0, len(spec.args) - 1))
    arg = spec.args[i]
    if arg.kind != "float":
        wrong_dtypes = [torch.int32, torch.float32] if spec.kernel else [torch.float32, torch.bool]
    elif spec.kernel and not arg.name.startswith("grad"):  # gradients may be any float
        wrong_dtypes = [torch.int64, torch.float16, torch.bool]
    else:
        wrong_dtypes = [torch.int64, torch.bool]
    wrong = data.draw(st.sampled_from(wrong_dtypes))
    args[i] = args[i].to(wrong)
    with pytest.raises(ERRORS) as error:
        run(spec, args)
    message = str(error.value)
    assert "got" in message and str(wrong).removeprefix("torch.") in message, message


@property_test
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@SETTINGS
@given(sizes=sizes_strategy(), data=st.data())
def test_other_device_is_named(spec, sizes, data):
    if not applicable(spec):
        pytest.skip("needs the compiled extension")
    args = valid_call(spec, sizes)
    i = data.draw(st.integers(0, len(spec.args) - 1))
    args[i] = args[i].to("meta")
    with pytest.raises(ERRORS) as error:
        run(spec, args)
    message = str(error.value)
    assert "meta" in message and "got" in message, message


@property_test
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@SETTINGS
@given(sizes=sizes_strategy(), data=st.data())
def test_views_give_the_contiguous_result(spec, sizes, data):
    """Transposed, sliced and expanded views (zero strides) of the same values."""
    if not applicable(spec):
        pytest.skip("needs the compiled extension")
    args = valid_call(spec, sizes)
    expected = flat(run(spec, args))
    views = list(args)
    for i in range(len(spec.args)):
        t = args[i]
        kind = data.draw(st.sampled_from(["transpose", "slice", "expand", "same"]))
        if kind == "transpose" and t.dim() >= 2:
            views[i] = t.transpose(0, -1).contiguous().transpose(0, -1)
        elif kind == "slice":
            views[i] = torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
        elif kind == "expand" and t.dim() >= 1 and t.shape[0] >= 1:
            first = t[:1]
            if bool((t == first).all()):
                views[i] = first.expand(t.shape)
    got = flat(run(spec, views))
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True)


@property_test
@pytest.mark.parametrize(
    "spec",
    [s for s in SPECS if any(a.kind == "topk" for a in s.args)],
    ids=[i for s, i in zip(SPECS, SPEC_IDS, strict=True) if any(a.kind == "topk" for a in s.args)],
)
@SETTINGS
@given(sizes=sizes_strategy(), data=st.data())
def test_out_of_range_keys_are_named(spec, sizes, data):
    if not applicable(spec):
        pytest.skip("needs the compiled extension")
    args = valid_call(spec, sizes)
    i = next(i for i, a in enumerate(spec.args) if a.kind == "topk")
    bad = data.draw(st.sampled_from([-1, sizes["S"], 2**40, -(2**62)]))
    where = data.draw(st.integers(0, args[i].numel() - 1))
    args[i].view(-1)[where] = bad
    with pytest.raises(ERRORS) as error:
        run(spec, args)
    assert_names(error.value, spec.args[i])
    assert str(sizes["S"]) in str(error.value)


@property_test
@pytest.mark.parametrize(
    "spec",
    [s for s in SPECS if any(a.kind in ("group", "index") for a in s.args)],
    ids=[
        i
        for s, i in zip(SPECS, SPEC_IDS, strict=True)
        if any(a.kind in ("group", "index") for a in s.args)
    ],
)
@SETTINGS
@given(sizes=sizes_strategy(), data=st.data())
def test_out_of_range_groups_and_lengths_are_harmless(spec, sizes, data):
    """Group ids outside [0, C) take no part and lengths are clamped: any value gives a result
    (the kernels bounds-check them in their loops), the one of the clamped value."""
    if not applicable(spec):
        pytest.skip("needs the compiled extension")
    args = valid_call(spec, sizes)
    i = data.draw(
        st.sampled_from([i for i, a in enumerate(spec.args) if a.kind in ("group", "index")])
    )
    bad = data.draw(st.sampled_from([-1, -(2**62), 2**22, 2**62]))
    args[i].view(-1)[data.draw(st.integers(0, max(args[i].numel() - 1, 0)))] = bad
    try:
        result = flat(run(spec, args))
    except ERRORS as error:  # a public function may refuse the value instead: then it names it
        assert_names(error, spec.args[i])
        return
    for t in result:
        assert t.device.type == "cpu"


# ---------------------------------------------------------------------------------------
# the crashes of issue 15 (in this subprocess too)
# ---------------------------------------------------------------------------------------


@property_test
@needs_kernels
def test_aggregate_backward_with_a_small_grad_is_refused():
    X = torch.rand(1, 1, 64, 4)
    G = torch.randint(0, 2**22, (1, 1, 64))
    F = torch.rand(1, 1, 2**22)
    with pytest.raises(ValueError, match=r"grad must have shape \(1, 1, 4194304, 4\); got"):
        torch.ops.attention_core.aggregate_backward(torch.rand(1, 1, 1, 4), X, G, F, None)


@property_test
@needs_kernels
def test_broadcast_backward_with_a_small_grad_is_refused():
    with pytest.raises(ValueError, match=r"grad must have shape \(1, 1, 4194304, 4\); got"):
        torch.ops.attention_core.broadcast_backward(
            torch.rand(1, 1, 1, 4),
            torch.rand(1, 1, 4, 4),
            torch.zeros(1, 1, 2**22, dtype=torch.long),
            torch.ones(1, 1, 4),
            None,
        )


@property_test
@needs_kernels
def test_grad_view_and_batch_mismatch_are_refused():
    X, G, F = torch.rand(1, 1, 16, 4), torch.zeros(1, 1, 16, dtype=torch.long), torch.ones(1, 1, 2)
    two_rows = torch.rand(1, 1, 16, 4)[:, :, :2]
    with pytest.raises(ValueError, match=r"grad must have shape \(1, 1, 16, 4\); got"):
        torch.ops.attention_core.broadcast_backward(two_rows, X[:, :, :2], G, F, None)
    with pytest.raises(ValueError, match=r"grad must have shape \(1, 1, 2, 4\); got \(4096,"):
        torch.ops.attention_core.aggregate_backward(torch.rand(4096, 1, 2, 4), X, G, F, None)
