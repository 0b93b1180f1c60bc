"""The ``Example:`` blocks of the package's docstrings run and print what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

MODULES = ["generation", "layers", "memory", "model", "reference"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"feedback_transformer.{name}")
    torch.manual_seed(0)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, globs={"torch": torch, **vars(module)}):
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} failing example(s) in {module.__name__}"


def test_there_are_examples():
    finder = doctest.DocTestFinder()
    count = sum(
        len(test.examples)
        for name in MODULES
        for test in finder.find(importlib.import_module(f"feedback_transformer.{name}"))
    )
    assert count >= 5
