"""The package installs, imports and moves in lockstep with attention-core, and uses only the
core's public modules."""

from pathlib import Path

import attention_core
import recurrent_transformer


def test_version_matches_core():
    assert recurrent_transformer.__version__ == attention_core.__version__


SOURCE = Path(recurrent_transformer.__file__).parent


def test_the_core_is_used_through_its_public_modules():
    """Validators come from attention_core.checks, never from the private attention_core._checks."""
    offenders = [
        str(path.relative_to(SOURCE))
        for path in sorted(SOURCE.rglob("*.py"))
        if "attention_core._checks" in path.read_text()
        or "from attention_core import _checks" in path.read_text()
    ]
    assert offenders == []
