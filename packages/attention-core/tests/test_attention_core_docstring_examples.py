"""The ``Example:`` blocks of the package's docstrings run and print what they show."""

from attention_core.testing.doctests import run_docstring_examples


def test_every_docstring_example_runs():
    attempted, failures = run_docstring_examples("attention_core")
    assert failures == []
    assert attempted >= 100  # the examples are found (a finder that sees none would pass)
