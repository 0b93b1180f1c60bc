"""Small helpers kept from fast-transformers' ``utils`` module."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

__all__ = ["check_state", "make_mirror"]


def check_state(state: Any = None, memory: Any = None) -> Any:
    """Return ``state``, accepting the deprecated keyword ``memory`` in its place.

    Recurrent modules used to call their state ``memory``; passing ``memory=`` still works
    but warns. Passing both is an error.
    """
    if memory is not None:
        if state is not None:
            raise ValueError("pass either state= or the deprecated memory=, not both")
        warnings.warn(
            "'memory' is deprecated for recurrent transformers and will be removed; "
            "use 'state' instead",
            DeprecationWarning,
            stacklevel=3,
        )
        state = memory
    return state


def make_mirror(src_module: nn.Module, dst_module: nn.Module) -> None:
    """Make ``dst_module`` use the very parameters of ``src_module`` (shared, not copied).

    Useful to train a batch model and run its recurrent twin with the same weights: both
    must have the same parameter names and shapes.
    """

    def setattr_recursive(mod, key, value):
        *path, name = key.split(".")
        for part in path:
            mod = getattr(mod, part)
        setattr(mod, name, value)

    src = dict(src_module.named_parameters())
    dst = dict(dst_module.named_parameters())
    if src.keys() != dst.keys():
        missing = sorted(set(src) ^ set(dst))[:5]
        raise ValueError(f"the modules have different parameters, e.g. {missing}")
    for name, parameter in src.items():
        if dst[name].shape != parameter.shape:
            raise ValueError(
                f"parameter {name!r} has shape {tuple(parameter.shape)} in src_module and "
                f"{tuple(dst[name].shape)} in dst_module"
            )
        setattr_recursive(dst_module, name, parameter)
