"""The repository's mypy settings (root ``pyproject.toml``) catch a wrong tensor argument type
in user code that calls the public API, also inside an unannotated function."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api", reason="mypy is not installed (nox -s typecheck)")

ROOT = Path(__file__).resolve().parents[3]
CONFIG = ROOT / "pyproject.toml"

SNIPPET = textwrap.dedent(
    """
    import torch
    from attention_core.causal_product import (
        causal_dot_product,
        elu_normalized_causal_dot_product,
    )
    from attention_core.masking import LengthMask

    Q = torch.randn(1, 2, 3, 4)
    out: torch.Tensor = causal_dot_product(Q, Q, Q)
    both: tuple[torch.Tensor, torch.Tensor] = causal_dot_product(Q, Q, Q, return_state=True)
    bad = elu_normalized_causal_dot_product(Q, Q, 3)
    bad_overload = causal_dot_product(Q, Q, 3)


    def unannotated():
        return LengthMask(3)
    """
)


GOOD = SNIPPET.replace("(Q, Q, 3)", "(Q, Q, Q)").replace(
    "LengthMask(3)", "LengthMask(torch.tensor([3]))"
)


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory) -> dict[str, dict[int, str]]:
    """``{file: {line: error}}`` of one mypy run, under the repository's configuration, over
    ``wrong.py`` (``SNIPPET``) and ``right.py`` (``GOOD``)."""
    folder = tmp_path_factory.mktemp("typing")
    (folder / "wrong.py").write_text(SNIPPET)
    (folder / "right.py").write_text(GOOD)
    arguments = ["--config-file", str(CONFIG), "--no-error-summary", "--show-error-codes"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)  # the configuration's paths are relative to the repository root
        stdout, stderr, status = mypy_api.run([*arguments, str(folder)])
    assert status in (0, 1), f"mypy did not run (status {status}):\n{stdout}\n{stderr}"
    errors: dict[str, dict[int, str]] = {"wrong.py": {}, "right.py": {}}
    for line in stdout.splitlines():
        if ": error:" in line:
            path, number, _ = line.split(":", 2)
            errors[Path(path).name][int(number)] = line
    return errors


def test_mypy_settings_catch_a_wrong_tensor_argument(mypy_errors):
    by_line = mypy_errors["wrong.py"]
    lines = SNIPPET.splitlines()
    bad = lines.index("bad = elu_normalized_causal_dot_product(Q, Q, 3)") + 1
    message = 'Argument 3 to "elu_normalized_causal_dot_product" has incompatible type "int"'
    assert message in by_line[bad]
    assert 'expected "Tensor"' in by_line[bad] and "[arg-type]" in by_line[bad]
    # an overloaded function (return_state selects the return type) is checked as well
    overload = lines.index("bad_overload = causal_dot_product(Q, Q, 3)") + 1
    assert '"Tensor", "Tensor", "int"' in by_line[overload]
    assert "[call-overload]" in by_line[overload]
    # check_untyped_defs: the body of a function without annotations is checked too
    untyped = lines.index("    return LengthMask(3)") + 1
    assert 'Argument 1 to "LengthMask" has incompatible type "int"' in by_line[untyped]
    # the correct calls (and the return_state overloads) pass: exactly the errors above
    assert sorted(by_line) == [bad, overload, untyped], by_line


def test_mypy_accepts_the_correct_calls(mypy_errors):
    assert mypy_errors["right.py"] == {}
