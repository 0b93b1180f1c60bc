"""Exceptions that keep fast-transformers' ``except`` clauses working.

Where fast-transformers raises ``TypeError`` or ``RuntimeError`` (often as a side effect, e.g.
a constructor called without an argument) and this project raises a ``ValueError`` with a
clearer message, the exception is one of these classes: it derives from ``ValueError`` and
from the type fast-transformers raises, so ``except ValueError`` and the old ``except
TypeError`` / ``except RuntimeError`` both catch it.

This module imports nothing of the package, so every module may use it.

Example:
    >>> try:
    ...     raise MissingParameterError("'linear' needs 'query_dimensions'")
    ... except TypeError as error:
    ...     isinstance(error, ValueError)
    True
"""

from __future__ import annotations

__all__ = ["MissingParameterError", "UnsupportedMaskError"]


class MissingParameterError(ValueError, TypeError):
    """A builder cannot construct an attention: a parameter it needs was not set.

    Also raised when a wrapper such as ``conditional-full`` is named without the attention it wraps.

    fast-transformers calls the constructor anyway and gets Python's ``TypeError`` for the
    missing argument; this error is both a ``ValueError`` and a ``TypeError``.
    """


class UnsupportedMaskError(ValueError, RuntimeError):
    """An attention got a mask it cannot apply.

    For example an arbitrary attention mask given to linear attention, which takes only all-ones
    masks (``causal-linear`` handles the causal one).

    fast-transformers raises ``RuntimeError`` there; this error is both a ``ValueError`` and a
    ``RuntimeError``.
    """
