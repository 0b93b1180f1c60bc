"""conftest.py for running fast-transformers' own test suite against this project.

``.ci/ft_suite.py`` copies it next to a copy of fast-transformers' ``tests/`` folder. It answers
every ``fast_transformers.X`` import with this project's module, as a migrating user would by
changing the import prefix:

* ``fast_transformers.recurrent.X`` -> ``recurrent_transformer.X``;
* ``fast_transformers.builders`` -> one module holding both ``attention_core.builders`` and
  ``recurrent_transformer.builders`` (fast-transformers keeps all builders in one module);
* every other ``fast_transformers.X`` -> ``attention_core.X``.

The aliases are the very same module objects (``sys.modules`` entries), so registering an
attention through ``fast_transformers.attention_registry`` registers it in attention_core.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

PREFIX = "fast_transformers"


def target_of(name: str) -> str:
    """The module of this project that answers the import of ``name``."""
    rest = name[len(PREFIX) :].lstrip(".")
    if rest == "recurrent" or rest.startswith("recurrent."):
        return "recurrent_transformer" + rest[len("recurrent") :]
    return "attention_core" + ("." + rest if rest else "")


def merged_builders() -> types.ModuleType:
    """``fast_transformers.builders``: the core's builders and the recurrent ones together."""
    core = importlib.import_module("attention_core.builders")
    recurrent = importlib.import_module("recurrent_transformer.builders")
    module = types.ModuleType(f"{PREFIX}.builders", core.__doc__)
    module.__path__ = list(core.__path__)  # submodules such as .attention_builders still import
    for source in (core, recurrent):
        for attribute in getattr(source, "__all__", None) or dir(source):
            if not attribute.startswith("_"):
                setattr(module, attribute, getattr(source, attribute))
    return module


class AliasLoader(importlib.abc.Loader):
    """Loads an alias by handing out the module it stands for."""

    def __init__(self, module: types.ModuleType):
        self.module = module
        self.spec = getattr(module, "__spec__", None)

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        # the import system pointed __spec__ at the alias: give the module its own back
        if self.spec is not None:
            module.__spec__ = self.spec


class AliasFinder(importlib.abc.MetaPathFinder):
    """Finds ``fast_transformers`` and its submodules as aliases of this project's modules."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != PREFIX and not fullname.startswith(PREFIX + "."):
            return None
        if fullname == f"{PREFIX}.builders":
            module = merged_builders()
        else:
            module = importlib.import_module(target_of(fullname))
        is_package = hasattr(module, "__path__")
        return importlib.machinery.ModuleSpec(fullname, AliasLoader(module), is_package=is_package)


if not any(isinstance(finder, AliasFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, AliasFinder())
