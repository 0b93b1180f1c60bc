"""A griffe extension for the docs build: read ``Example:`` as the ``Examples:`` section.

Google-style docstrings in this repository introduce doctests with ``Example:``. griffe knows
only the plural as a section and would render the singular as an admonition whose ``>>>``
lines become nested block quotes; this rewrites the heading before the docstrings are parsed.
Loaded by mkdocstrings (``extensions`` in mkdocs.yml); nothing here imports the packages.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_SINGULAR = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(Extension):
    """Rename every ``Example:`` heading line of a docstring to ``Examples:``."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is not None and "Example:" in docstring.value:
            docstring.value = _SINGULAR.sub(r"\g<indent>Examples:", docstring.value)
