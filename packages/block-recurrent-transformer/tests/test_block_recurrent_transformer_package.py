"""The package installs, imports and moves in lockstep with attention-core, and uses only the
core's public modules."""

from pathlib import Path

import attention_core
import block_recurrent_transformer


def test_version_matches_core():
    assert block_recurrent_transformer.__version__ == attention_core.__version__


SOURCE = Path(block_recurrent_transformer.__file__).parent


def test_the_core_is_used_through_its_public_modules():
    """Validators come from attention_core.checks, never from the private attention_core._checks."""
    offenders = [
        str(path.relative_to(SOURCE))
        for path in sorted(SOURCE.rglob("*.py"))
        if "attention_core._checks" in path.read_text()
        or "from attention_core import _checks" in path.read_text()
    ]
    assert offenders == []


def test_no_module_is_over_400_lines():
    lengths = {p.name: len(p.read_text().splitlines()) for p in SOURCE.rglob("*.py")}
    assert len(lengths) >= 10
    assert {name: n for name, n in lengths.items() if n > 400} == {}
