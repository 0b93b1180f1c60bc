"""Argument validators for models and layers built on attention_core.

Each validator checks one argument before anything is computed, returns it (so that a
constructor can write `self.dropout = check_probability("dropout", dropout)`) and otherwise
raises an error whose message names the argument, what it expects and what it got:

    dropout must be a probability in [0, 1]; got 1.5

Python scalars are checked exactly: `True` is not an int and `1` is not a bool, since a flag
passed in the wrong position is a common mistake. A wrong type of a flag, an int or a tensor
raises `TypeError`; a number or a tensor of the right type with a wrong value or shape raises
`ValueError` (numbers of a wrong type too, for `check_positive_int`, `check_positive_number`
and `check_probability`).

This module imports nothing of attention_core, so that every module can use it.

Example:
    >>> check_probability("dropout", 0.1)
    0.1
    >>> check_probability("dropout", 1.5)
    Traceback (most recent call last):
      ...
    ValueError: dropout must be a probability in [0, 1]; got 1.5
    >>> tokens = torch.tensor([[1, 2, 7]])
    >>> check_token_ids("tokens", tokens, num_tokens=5)
    Traceback (most recent call last):
      ...
    ValueError: tokens must hold token ids in [0, 5); got values in [1, 7]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeGuard, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")

__all__ = [
    "check_bool",
    "check_choice",
    "check_int",
    "check_model_dtype",
    "check_positive_int",
    "check_positive_number",
    "check_probability",
    "check_tensor",
    "check_token_ids",
    "check_tokens",
]


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------
# Python scalars
# ---------------------------------------------------------------------------------------


def check_bool(name: str, value: object) -> bool:
    """Check that `value` is a bool (`True` or `False`, not `0`, `1` or `None`).

    Arguments:
        name: the argument's name, for the error message.
        value: the value to check.

    Returns:
        `value`.

    Raises:
        TypeError: `value` is not a bool.

    Example:
        >>> check_bool("causal", True)
        True
        >>> check_bool("causal", 1)
        Traceback (most recent call last):
          ...
        TypeError: causal must be a bool; got 1 (int)
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {value!r} ({type(value).__name__})")
    return value


def check_int(name: str, value: object) -> int:
    """Check that `value` is an int of any sign (not a bool), e.g. an `ignore_index`.

    Arguments:
        name: the argument's name, for the error message.
        value: the value to check.

    Returns:
        `value`.

    Raises:
        TypeError: `value` is not an int.

    Example:
        >>> check_int("ignore_index", -100)
        -100
        >>> check_int("ignore_index", 0.5)
        Traceback (most recent call last):
          ...
        TypeError: ignore_index must be an int; got 0.5 (float)
    """
    if not _is_int(value):
        raise TypeError(f"{name} must be an int; got {value!r} ({type(value).__name__})")
    return value


def check_positive_int(name: str, value: object, *, allow_zero: bool = False) -> int:
    """Check that `value` is an int `> 0` (or `>= 0` with `allow_zero`), not a bool.

    Arguments:
        name: the argument's name, for the error message.
        value: the value to check.
        allow_zero: accept `0` too.

    Returns:
        `value`.

    Raises:
        ValueError: `value` is not an int or is out of range.

    Example:
        >>> check_positive_int("heads", 8)
        8
        >>> check_positive_int("heads", 0)
        Traceback (most recent call last):
          ...
        ValueError: heads must be a positive int; got 0
        >>> check_positive_int("max_new_tokens", 0, allow_zero=True)
        0
    """
    low = 0 if allow_zero else 1
    if not _is_int(value) or value < low:
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name} must be {kind} int; got {value!r}")
    return value


def check_positive_number(name: str, value: object) -> float:
    """Check that `value` is an int or a float `> 0` (not a bool, NaN or a tensor).

    Arguments:
        name: the argument's name, for the error message.
        value: the value to check.

    Returns:
        `float(value)`.

    Raises:
        ValueError: `value` is not a number or is not positive.

    Example:
        >>> check_positive_number("ff_mult", 4)
        4.0
        >>> check_positive_number("ff_mult", -1.5)
        Traceback (most recent call last):
          ...
        ValueError: ff_mult must be a positive number; got -1.5
    """
    if not _is_number(value) or not value > 0:
        raise ValueError(f"{name} must be a positive number; got {value!r}")
    return float(value)


def check_probability(name: str, value: object, *, allow_one: bool = True) -> float:
    """Check that `value` is a probability: an int or a float in `[0, 1]` (or `[0, 1)`).

    Arguments:
        name: the argument's name, for the error message.
        value: the value to check.
        allow_one: accept `1`; `False` for a dropout rate, where 1 would drop everything.

    Returns:
        `float(value)`.

    Raises:
        ValueError: `value` is not a number or is out of range (NaN included).

    Example:
        >>> check_probability("state_dropout", 0)
        0.0
        >>> check_probability("attn_dropout", 1.0, allow_one=False)
        Traceback (most recent call last):
          ...
        ValueError: attn_dropout must be a probability in [0, 1); got 1.0
    """
    if not _is_number(value) or not (0 <= value <= 1 if allow_one else 0 <= value < 1):
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must be a probability in {interval}; got {value!r}")
    return float(value)


def check_choice(name: str, value: T, choices: Sequence[object]) -> T:
    """Check that `value` is one of `choices` (compared with `==`).

    Arguments:
        name: the argument's name, for the error message.
        value: the value to check.
        choices: the accepted values.

    Returns:
        `value`.

    Raises:
        ValueError: `value` is not among `choices`.

    Example:
        >>> check_choice("gate_type", "lstm", ("fixed", "lstm"))
        'lstm'
        >>> check_choice("gate_type", "gru", ("fixed", "lstm"))
        Traceback (most recent call last):
          ...
        ValueError: gate_type must be one of ('fixed', 'lstm'); got 'gru'
    """
    if not any(type(value) is type(choice) and value == choice for choice in choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}")
    return value


# ---------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------


def _shape_text(shape: Sequence[int | str | None]) -> str:
    sizes = ["*" if s is None else str(s) for s in shape]
    return f"({', '.join(sizes)}{',' if len(sizes) == 1 else ''})"


def check_tensor(
    name: str,
    x: object,
    *,
    dim: int | None = None,
    shape: Sequence[int | str | None] | None = None,
    floating: bool = False,
    integer: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Check that `x` is a tensor with the given rank, shape, kind of dtype, dtype and device.

    Arguments:
        name: the argument's name, for the error message.
        x: the value to check.
        dim: the number of dimensions, or `None` for any.
        shape: the expected shape; an int entry must match exactly, a `str` (the size's
            name, shown in the message) or `None` entry matches any size.
        floating: require a floating point dtype.
        integer: require an integer dtype (not bool).
        dtype: require exactly this dtype.
        device: require this device.

    Returns:
        `x`.

    Raises:
        TypeError: `x` is not a tensor or has a wrong dtype.
        ValueError: `x` has a wrong rank, shape or device.

    Example:
        >>> seq = torch.zeros(2, 5, dtype=torch.long)
        >>> check_tensor("seq", seq, shape=(2, "n"), integer=True).shape
        torch.Size([2, 5])
        >>> check_tensor("seq", seq, shape=(3, "n"))
        Traceback (most recent call last):
          ...
        ValueError: seq must have shape (3, n); got (2, 5)
        >>> check_tensor("seq", seq.float(), integer=True)
        Traceback (most recent call last):
          ...
        TypeError: seq must be an integer tensor; got dtype torch.float32
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions; got shape {tuple(x.shape)}")
    if shape is not None and (
        x.dim() != len(shape) or any(isinstance(s, int) and s != n for s, n in zip(shape, x.shape))
    ):
        raise ValueError(f"{name} must have shape {_shape_text(shape)}; got {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor; got dtype {x.dtype}")
    if integer and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor; got dtype {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}; got {x.dtype}")
    if device is not None and x.device != torch.device(device):
        raise ValueError(f"{name} must be on device {device}; got {x.device}")
    return x


def check_model_dtype(name: str, x: Tensor, model_dtype: torch.dtype) -> Tensor:
    """Check that the floating point input `x` has the dtype of the model's parameters.

    A model never converts its input silently (a float16 input would be computed in float32
    and come back float32, or lose precision the other way round). Under `torch.autocast`
    the dtypes legitimately differ, and nothing is checked.

    Arguments:
        name: the argument's name, for the error message.
        x: the input tensor.
        model_dtype: the dtype of the model's parameters.

    Returns:
        `x`.

    Raises:
        TypeError: the dtypes differ outside `torch.autocast`.

    Example:
        >>> x = torch.zeros(2, 3, dtype=torch.float64)
        >>> check_model_dtype("x", x, torch.float32)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
          ...
        TypeError: x must have the dtype of the model's parameters (torch.float32)...
    """
    if x.dtype != model_dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{name} must have the dtype of the model's parameters ({model_dtype}); got "
            f"{x.dtype} (convert the input with {name}.to({model_dtype}) or the model with "
            f"model.to({x.dtype}))"
        )
    return x


def check_token_ids(
    name: str, tokens: Tensor, num_tokens: int, *, ignore_index: int | None = None
) -> Tensor:
    """Check that the integer tensor `tokens` holds ids in `[0, num_tokens)`.

    With `ignore_index` (the label that a loss skips, e.g. `-100`), that value is accepted
    too, and the message shows the first id out of range. Reads the values (one device
    synchronisation on CUDA); skipped under `torch.compile` and for empty tensors. Check
    the dtype first with `check_tensor(name, tokens, integer=True)`.

    Arguments:
        name: the argument's name, for the error message.
        tokens: integer tensor of any shape.
        num_tokens: the vocabulary size.
        ignore_index: a value accepted besides the ids, or `None`.

    Returns:
        `tokens`.

    Raises:
        ValueError: a value is out of range.

    Example:
        >>> labels = torch.tensor([[3, -100, 4]])
        >>> check_token_ids("labels", labels, 5, ignore_index=-100).shape
        torch.Size([1, 3])
        >>> bad = torch.tensor([[3, -100, 9]])
        >>> check_token_ids("labels", bad, 5, ignore_index=-100)
        Traceback (most recent call last):
          ...
        ValueError: labels must hold token ids in [0, 5) or ignore_index = -100; got 9
    """
    if not tokens.numel() or torch.compiler.is_compiling():
        return tokens
    if ignore_index is None:
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= num_tokens:
            raise ValueError(
                f"{name} must hold token ids in [0, {num_tokens}); got values in [{low}, {high}]"
            )
        return tokens
    bad = (tokens != ignore_index) & ((tokens < 0) | (tokens >= num_tokens))
    if bool(bad.any()):
        raise ValueError(
            f"{name} must hold token ids in [0, {num_tokens}) or ignore_index = {ignore_index}; "
            f"got {tokens[bad][0].item()}"
        )
    return tokens


def check_tokens(
    name: str,
    tokens: object,
    num_tokens: int,
    *,
    shape: Sequence[int | str | None] = ("B", "n"),
    min_length: int = 0,
    device: torch.device | str | None = None,
    ignore_index: int | None = None,
) -> Tensor:
    """Check a tensor of token ids: its type, shape, device, length and values, in that order.

    The checks of a language model's input in one call: `check_tensor` (an integer tensor
    with `len(shape)` dimensions, of `shape`, on `device`), at least `min_length` entries
    along the last axis, then `check_token_ids` (ids in `[0, num_tokens)`, or
    `ignore_index`).

    Arguments:
        name: the argument's name, for the error message.
        tokens: the value to check.
        num_tokens: the vocabulary size.
        shape: the expected shape, as in `check_tensor`; `("B", "n")` by default.
        min_length: the least size of the last axis.
        device: require this device, or `None` for any.
        ignore_index: a value accepted besides the ids (a label that the loss skips).

    Returns:
        `tokens`.

    Raises:
        TypeError: `tokens` is not a tensor or not of an integer dtype.
        ValueError: a wrong rank, shape, device or length, or an id out of range.

    Example:
        >>> check_tokens("seq", torch.tensor([[1, 2, 3]]), 10, min_length=2).shape
        torch.Size([1, 3])
        >>> check_tokens("seq", torch.tensor([[1]]), 10, min_length=2)
        Traceback (most recent call last):
          ...
        ValueError: seq must have shape (B, n) with n >= 2; got (1, 1)
        >>> check_tokens("tokens", torch.tensor([4, 12]), 10, shape=(2,))
        Traceback (most recent call last):
          ...
        ValueError: tokens must hold token ids in [0, 10); got values in [4, 12]
    """
    tokens = check_tensor(name, tokens, dim=len(shape), shape=shape, integer=True, device=device)
    if shape and not isinstance(shape[-1], int) and tokens.shape[-1] < min_length:
        length = shape[-1] or "n"
        raise ValueError(
            f"{name} must have shape {_shape_text(shape)} with {length} >= {min_length}; "
            f"got {tuple(tokens.shape)}"
        )
    return check_token_ids(name, tokens, num_tokens, ignore_index=ignore_index)
