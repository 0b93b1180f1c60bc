"""Small helpers kept from fast-transformers' ``utils`` module, and a hook test for fast paths.

`forward_hooks_registered` tells a fast path that replaces module calls whether a hook would
miss them."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

__all__ = ["check_state", "forward_hooks_registered", "make_mirror"]


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


_MODULE_HOOKS = torch.nn.modules.module  # where torch keeps the global forward hooks


def forward_hooks_registered(*modules: nn.Module | None) -> bool:
    """Tell whether a forward hook would see a call of one of ``modules``.

    A fast path that computes what some modules compute without calling them (an inference
    step that reads their weights, a fused kernel that applies a feature map) may run only
    when this is ``False``: no forward or forward-pre hook on any of ``modules`` (``None``
    entries are skipped) and no global one (``nn.modules.module.register_module_forward_hook``
    and its pre-hook twin). Otherwise the caller takes its composed path, which calls the
    modules and so their hooks.

    Arguments:
        modules: the modules whose calls the fast path replaces.

    Returns:
        ``True`` when a hook is registered.

    Example:
        >>> layer = nn.Linear(4, 4)
        >>> forward_hooks_registered(layer)
        False
        >>> handle = layer.register_forward_hook(lambda module, args, out: None)
        >>> forward_hooks_registered(layer)
        True
        >>> handle.remove()
    """
    if _MODULE_HOOKS._global_forward_hooks or _MODULE_HOOKS._global_forward_pre_hooks:
        return True
    return any(m is not None and (m._forward_hooks or m._forward_pre_hooks) for m in modules)
