"""Find public API without a docstring: every package's tests assert the list is empty."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

__all__ = ["undocumented"]


def _public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    return list(names)


def _documented_in(cls, attr: str, package: str) -> bool:
    """Whether ``cls.attr`` or the method of ``package`` it overrides has a docstring.

    A docstring inherited from torch, e.g. ``nn.Module.forward``'s, does not count."""
    for base in cls.__mro__:
        member = vars(base).get(attr)
        if member is None or not base.__module__.startswith(package):
            continue
        if (getattr(member, "__doc__", None) or "").strip():
            return True
    return False


def undocumented(package: str, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Dotted names of the public objects of ``package`` that have no docstring.

    Dotted names of the public modules, classes, functions and methods of ``package`` (and its
    submodules, except private ones and those whose dotted name starts with an entry of ``skip``)
    that have no docstring. Only objects defined in ``package`` count; a public method of a public
    class counts unless it, or the method of the package it overrides, has a docstring
    (``extra_repr`` aside: it only formats the module's repr)."""
    root = importlib.import_module(package)
    modules = [root]
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        if any(part.startswith("_") for part in info.name.split(".")) or info.name.startswith(skip):
            continue
        modules.append(importlib.import_module(info.name))
    missing = []
    for module in modules:
        if not inspect.getdoc(module):
            missing.append(module.__name__)
        for name in _public_names(module):
            obj = getattr(module, name, None)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if not getattr(obj, "__module__", "").startswith(package):
                continue
            if obj.__module__ != module.__name__:
                continue  # re-exported: checked where it is defined
            if not (obj.__doc__ or "").strip():
                missing.append(f"{module.__name__}.{name}")
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if (
                        attr.startswith("_")
                        or attr == "extra_repr"
                        or not inspect.isfunction(member)
                    ):
                        continue
                    if not _documented_in(obj, attr, package):
                        missing.append(f"{module.__name__}.{name}.{attr}")
    return sorted(set(missing))
