"""Tests of attention_core.checks: each validator accepts what it documents, returns it, and
refuses the rest with a message that names the argument, the expected and the actual value."""

from __future__ import annotations

import doctest
import math
import re

import pytest
import torch

from attention_core import _checks, checks
from attention_core.checks import (
    check_bool,
    check_choice,
    check_int,
    check_model_dtype,
    check_positive_int,
    check_positive_number,
    check_probability,
    check_tensor,
    check_token_ids,
    check_tokens,
)


def raises(error, message, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` raises ``error`` with exactly ``message``."""
    with pytest.raises(error) as info:
        fn(*args, **kwargs)
    assert str(info.value) == message
    return info.value


def test_docstring_examples_run():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(checks, globs={"torch": torch, **vars(checks)})
    for test in tests:
        runner.run(test)
    assert runner.failures == 0
    assert sum(len(t.examples) for t in tests) >= 20
    documented = {t.name.rsplit(".", 1)[-1] for t in tests if t.examples}
    assert set(checks.__all__) <= documented, set(checks.__all__) - documented


def test_one_implementation():
    """The kernels' checks module re-exports the public validators, it does not copy them."""
    for name in ("check_tensor", "check_positive_int", "check_token_ids", "check_model_dtype"):
        assert getattr(_checks, name) is getattr(checks, name)


# Python scalars


def test_check_bool():
    assert check_bool("causal", True) is True
    assert check_bool("causal", False) is False
    raises(TypeError, "causal must be a bool; got 1 (int)", check_bool, "causal", 1)
    raises(TypeError, "causal must be a bool; got None (NoneType)", check_bool, "causal", None)
    raises(TypeError, "flag must be a bool; got 'yes' (str)", check_bool, "flag", "yes")
    raises(
        TypeError, "flag must be a bool; got tensor(True) (Tensor)", check_bool, "flag",
        torch.tensor(True),
    )  # fmt: skip


def test_check_int():
    assert check_int("ignore_index", -100) == -100
    assert check_int("ignore_index", 0) == 0
    raises(TypeError, "ignore_index must be an int; got True (bool)", check_int, "ignore_index",
           True)  # fmt: skip
    raises(TypeError, "ignore_index must be an int; got 2.0 (float)", check_int, "ignore_index",
           2.0)  # fmt: skip


@pytest.mark.parametrize("allow_zero", [False, True], ids=["positive", "non-negative"])
def test_check_positive_int(allow_zero):
    kind = "a non-negative" if allow_zero else "a positive"
    assert check_positive_int("depth", 3, allow_zero=allow_zero) == 3
    if allow_zero:
        assert check_positive_int("depth", 0, allow_zero=True) == 0
    else:
        raises(ValueError, "depth must be a positive int; got 0", check_positive_int, "depth", 0)
    for bad in (-1, True, 2.0, "3", None):
        raises(
            ValueError, f"depth must be {kind} int; got {bad!r}", check_positive_int, "depth",
            bad, allow_zero=allow_zero,
        )  # fmt: skip


def test_check_positive_number():
    assert check_positive_number("ff_mult", 4) == 4.0
    assert isinstance(check_positive_number("ff_mult", 4), float)
    assert check_positive_number("scale", 1e-9) == 1e-9
    for bad in (0, -2.5, math.nan, True, "4", None, torch.tensor(2.0)):
        raises(ValueError, f"ff_mult must be a positive number; got {bad!r}",
               check_positive_number, "ff_mult", bad)  # fmt: skip
    assert check_positive_number("scale", math.inf) == math.inf


def test_check_probability():
    for good in (0, 0.0, 0.25, 1, 1.0):
        assert check_probability("p", good) == float(good)
        assert isinstance(check_probability("p", good), float)
    for bad in (-0.1, 1.5, math.nan, math.inf, True, "0.5", None):
        raises(ValueError, f"p must be a probability in [0, 1]; got {bad!r}",
               check_probability, "p", bad)  # fmt: skip
    assert check_probability("dropout", 0.999, allow_one=False) == 0.999
    raises(ValueError, "dropout must be a probability in [0, 1); got 1", check_probability,
           "dropout", 1, allow_one=False)  # fmt: skip


def test_check_choice():
    assert check_choice("gate_type", "fixed", ("fixed", "lstm")) == "fixed"
    assert check_choice("position_encoding", None, ("rotary", None)) is None
    raises(ValueError, "gate_type must be one of ('fixed', 'lstm'); got 'gru'", check_choice,
           "gate_type", "gru", ("fixed", "lstm"))  # fmt: skip
    # no bool for an int choice, no float for a str, lists shown as tuples
    raises(ValueError, "order must be one of (1, 2); got True", check_choice, "order", True, [1, 2])
    raises(ValueError, "mode must be one of ('a',); got 1.0", check_choice, "mode", 1.0, ["a"])


# tensors


def test_check_tensor_accepts_and_returns():
    x = torch.zeros(2, 5, 3)
    assert check_tensor("x", x, dim=3, shape=(2, "n", None), floating=True) is x
    assert check_tensor("x", x, dtype=torch.float32, device="cpu") is x
    assert check_tensor("x", x, device=torch.device("cpu")) is x
    ids = torch.zeros(4, dtype=torch.int32)
    assert check_tensor("ids", ids, shape=(4,), integer=True) is ids


def test_check_tensor_messages():
    x = torch.zeros(2, 5)
    raises(TypeError, "x must be a torch.Tensor; got list", check_tensor, "x", [1.0])
    raises(ValueError, "x must have 3 dimensions; got shape (2, 5)", check_tensor, "x", x, dim=3)
    raises(ValueError, "x must have shape (3, n); got (2, 5)", check_tensor, "x", x,
           shape=(3, "n"))  # fmt: skip
    raises(ValueError, "x must have shape (2, *, 1); got (2, 5)", check_tensor, "x", x,
           shape=(2, None, 1))  # fmt: skip
    raises(ValueError, "x must have shape (2,); got (2, 5)", check_tensor, "x", x, shape=(2,))
    raises(TypeError, "x must be a floating point tensor; got dtype torch.int64", check_tensor,
           "x", x.long(), floating=True)  # fmt: skip
    for dtype in (torch.float32, torch.bool, torch.complex64):
        raises(TypeError, f"x must be an integer tensor; got dtype {dtype}", check_tensor, "x",
               x.to(dtype), integer=True)  # fmt: skip
    raises(TypeError, "x must have dtype torch.float64; got torch.float32", check_tensor, "x", x,
           dtype=torch.float64)  # fmt: skip
    raises(ValueError, "x must be on device meta; got cpu", check_tensor, "x", x, device="meta")


def test_check_model_dtype():
    x = torch.zeros(2, 3, dtype=torch.float64)
    assert check_model_dtype("x", x, torch.float64) is x
    error = raises(
        TypeError,
        "x must have the dtype of the model's parameters (torch.float32); got torch.float64 "
        "(convert the input with x.to(torch.float32) or the model with model.to(torch.float64))",
        check_model_dtype, "x", x, torch.float32,
    )  # fmt: skip
    assert isinstance(error, TypeError)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert check_model_dtype("x", x, torch.float32) is x


def test_check_token_ids():
    tokens = torch.tensor([[0, 4], [2, 3]])
    assert check_token_ids("seq", tokens, 5) is tokens
    assert check_token_ids("seq", torch.zeros(2, 0, dtype=torch.long), 5).shape == (2, 0)
    raises(ValueError, "seq must hold token ids in [0, 4); got values in [0, 4]",
           check_token_ids, "seq", tokens, 4)  # fmt: skip
    raises(ValueError, "seq must hold token ids in [0, 5); got values in [-1, 4]",
           check_token_ids, "seq", torch.tensor([4, -1]), 5)  # fmt: skip


def test_check_token_ids_with_ignore_index():
    labels = torch.tensor([[1, -100], [-100, 4]])
    assert check_token_ids("labels", labels, 5, ignore_index=-100) is labels
    # without ignore_index, -100 is out of range
    with pytest.raises(ValueError, match=re.escape("got values in [-100, 4]")):
        check_token_ids("labels", labels, 5)
    # the first value out of range, in row-major order
    raises(ValueError, "labels must hold token ids in [0, 5) or ignore_index = -100; got 7",
           check_token_ids, "labels", torch.tensor([[1, 7], [-3, 5]]), 5,
           ignore_index=-100)  # fmt: skip
    raises(ValueError, "labels must hold token ids in [0, 5) or ignore_index = 0; got -100",
           check_token_ids, "labels", labels, 5, ignore_index=0)  # fmt: skip
    # an ignore_index inside the vocabulary is just another accepted value
    assert check_token_ids("labels", torch.tensor([0, 4]), 5, ignore_index=0).shape == (2,)


def test_check_tokens():
    seq = torch.tensor([[1, 2, 3], [0, 9, -100]])
    assert check_tokens("seq", seq, 10, min_length=3, ignore_index=-100) is seq
    assert check_tokens("tokens", seq[:, 0], 10, shape=(2,)) is not None
    raises(TypeError, "seq must be a torch.Tensor; got list", check_tokens, "seq", [[1]], 10)
    raises(TypeError, "seq must be an integer tensor; got dtype torch.float32", check_tokens,
           "seq", seq.float(), 10)  # fmt: skip
    raises(ValueError, "seq must have 2 dimensions; got shape (3,)", check_tokens, "seq",
           seq[0], 10)  # fmt: skip
    raises(ValueError, "tokens must have shape (3,); got (2,)", check_tokens, "tokens",
           seq[:, 0], 10, shape=(3,))  # fmt: skip
    raises(ValueError, "seq must have shape (B, n) with n >= 4; got (2, 3)", check_tokens,
           "seq", seq, 10, min_length=4)  # fmt: skip
    raises(ValueError, "prompt must have shape (B, T) with T >= 1; got (2, 0)", check_tokens,
           "prompt", seq[:, :0], 10, shape=("B", "T"), min_length=1)  # fmt: skip
    raises(ValueError, "seq must be on device meta; got cpu", check_tokens, "seq", seq, 10,
           device="meta")  # fmt: skip
    raises(ValueError, "seq must hold token ids in [0, 10); got values in [-100, 9]",
           check_tokens, "seq", seq, 10)  # fmt: skip
    raises(ValueError, "seq must hold token ids in [0, 9) or ignore_index = -100; got 9",
           check_tokens, "seq", seq, 9, ignore_index=-100)  # fmt: skip
