"""This module runs the ``Example:`` blocks of a package's docstrings.

Every package's tests assert that they all pass, so an example on an API page is an example
that works.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import torch

__all__ = ["run_docstring_examples"]


def run_docstring_examples(package: str) -> tuple[int, list[str]]:
    """Run the docstring examples of ``package`` and its public submodules.

    Private modules (a name part starting with ``_``) are left out, as on the API pages; they
    may need optional dependencies (Triton). Each module's examples see ``torch`` and the
    module's own names (as a reader of its API page does), start from
    ``torch.manual_seed(0)``, and compare output with ``NORMALIZE_WHITESPACE`` and
    ``ELLIPSIS``.

    Arguments:
        package: an importable package name, e.g. ``"attention_core"``.

    Returns:
        ``(examples, failures)``: the number of example statements run, and one line per
        failing docstring (its dotted name and the number of failing statements).
    """
    root = importlib.import_module(package)
    names = [package] + [
        info.name
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}.")
        if not any(part.startswith("_") for part in info.name.split("."))
    ]
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    attempted, failures = 0, []
    for name in names:
        module = importlib.import_module(name)
        runner = doctest.DocTestRunner(optionflags=flags)
        for test in doctest.DocTestFinder().find(module, globs={"torch": torch, **vars(module)}):
            if not test.examples:
                continue
            torch.manual_seed(0)
            result = runner.run(test, out=lambda text: None)
            attempted += result.attempted
            if result.failed:
                failures.append(f"{test.name}: {result.failed} failing statement(s)")
    return attempted, failures
