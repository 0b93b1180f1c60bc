"""Every public docstring renders on the API pages (``nox -s docs``).

mkdocstrings renders Google-style docstrings as Markdown and shows the first line of each as
its summary. A Sphinx role (``:class:`X```) renders as raw text, and a summary wrapped over a
line break is cut mid-sentence, so both fail here. The packages are read statically with griffe,
as the site build reads them: nothing is imported.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import griffe
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "attention_core": "attention-core",
    "recurrent_transformer": "recurrent-transformer",
    "block_recurrent_transformer": "block-recurrent-transformer",
    "feedback_transformer": "feedback-transformer",
}

# Files not held to these checks yet (none today). Paths relative to the repository root; a
# folder ends with "/". Remove an entry as soon as its files pass: the test below fails on an
# entry that no longer excuses anything.
ALLOWED: tuple[str, ...] = ()

ROLE = re.compile(r":(?:py:)?(?:meth|class|func|mod|attr|obj|exc|data|const|ref)s?:`")
SENTENCE_END = re.compile(r"[.!?][)\"'`*]*$")
EXAMPLES = re.compile(r"^(?P<indent>\s*)Examples?:\s*$")
DOCTEST_FLAGS = re.compile(r"\s*# doctest:.*$")  # not rendered (trim_doctest_flags)
# the characters of a code block that the content column shows at 1400 px without scrolling
EXAMPLE_WIDTH = 78


def long_example_lines(text: str) -> list[str]:
    """The lines of the ``Example:`` sections of ``text`` wider than ``EXAMPLE_WIDTH``."""
    long, section = [], None
    for line in text.split("\n"):
        heading = EXAMPLES.match(line)
        if heading:
            section = len(heading["indent"])
        elif section is not None and line.strip():
            indent = len(line) - len(line.lstrip())
            if indent <= section:
                section = None
            elif len(DOCTEST_FLAGS.sub("", line)) - section - 4 > EXAMPLE_WIDTH:
                long.append(line.strip())
    return long


def _is_public(obj: griffe.Object) -> bool:
    """Whether mkdocstrings' ``filters: public`` shows ``obj`` (private modules included)."""
    if obj.is_module:
        return not obj.name.startswith("_") or obj.name == "__init__"
    return obj.is_public


def public_objects() -> Iterator[griffe.Object]:
    """Every public module, class, function and attribute of the four packages."""
    for name, folder in PACKAGES.items():
        loader = griffe.GriffeLoader(
            search_paths=[str(ROOT / "packages" / folder / "src")], allow_inspection=False
        )
        stack: list[griffe.Object] = [loader.load(name)]
        while stack:
            obj = stack.pop()
            yield obj
            stack.extend(
                member
                for member in obj.members.values()
                if not member.is_alias and _is_public(member)
            )


def _source(obj: griffe.Object) -> str:
    return Path(obj.filepath).resolve().relative_to(ROOT).as_posix()


def _allowed(path: str) -> bool:
    return path.startswith(ALLOWED)


def docstring_problems(obj: griffe.Object) -> list[str]:
    """What would render badly in ``obj``'s docstring: raw roles, a cut summary, wide examples."""
    text = obj.docstring.value
    lines = text.split("\n")
    problems = []
    roles = ROLE.findall(text)
    if roles:
        problems.append(f"{len(roles)} Sphinx role(s) such as {roles[0]!r}")
    if not SENTENCE_END.search(lines[0].strip()):
        problems.append(f"summary does not end a sentence: {lines[0]!r}")
    elif len(lines) > 1 and lines[1].strip():
        problems.append(f"summary continues on the next line: {lines[1].strip()!r}")
    problems.extend(
        f"example line wider than {EXAMPLE_WIDTH} characters: {line!r}"
        for line in long_example_lines(text)
    )
    return problems


@pytest.fixture(scope="module")
def documented() -> list[griffe.Object]:
    return [obj for obj in public_objects() if obj.docstring is not None]


def test_the_walk_sees_the_public_api(documented):
    paths = {obj.path for obj in documented}
    for path in (
        "attention_core.masking.LengthMask",
        "attention_core.builders.transformer_builders.TransformerEncoderBuilder",
        "recurrent_transformer.transformers.RecurrentTransformerEncoder",
        "block_recurrent_transformer.gates",
    ):
        assert path in paths, path
    assert not any(part.startswith("_op") for obj in documented for part in obj.path.split("."))


def test_public_docstrings_have_no_roles_and_a_one_line_summary(documented):
    failures = [
        f"{_source(obj)}:{obj.docstring.lineno} {obj.path}: {problem}"
        for obj in documented
        if not _allowed(_source(obj))
        for problem in docstring_problems(obj)
    ]
    assert not failures, f"{len(failures)} docstring(s) render badly:\n" + "\n".join(failures)


def test_every_allowed_entry_still_excuses_something(documented):
    bad_files = {_source(obj) for obj in documented if docstring_problems(obj)}
    stale = [entry for entry in ALLOWED if not any(f.startswith(entry) for f in bad_files)]
    assert not stale, f"remove from ALLOWED, these pass now: {stale}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Return the mask.", []),
        ("Like :class:`LengthMask`.", ["role"]),
        ("Split a tensor along dimension 0 into\nequal parts.", ["sentence"]),
        ("The first line is a sentence.\nThe next one wraps on.", ["next line"]),
        ("Attend.\n\nArguments:\n    x: the input.", []),
        ("Attend.\n\nExample:\n    >>> " + "x" * 75 + "\n    done", ["wider"]),
        ("Attend.\n\nExample:\n    >>> " + "x" * 74 + "\n\nAfter.", []),
    ],
)
def test_the_checks_catch_what_they_claim(text, expected):
    obj = griffe.Function("f", lineno=1)
    obj.docstring = griffe.Docstring(text, lineno=1, parent=obj)
    problems = docstring_problems(obj)
    assert len(problems) == len(expected), problems
    for problem, word in zip(problems, expected, strict=True):
        assert word in problem
