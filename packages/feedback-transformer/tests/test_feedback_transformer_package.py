"""The package installs, imports and moves in lockstep with attention-core."""

import attention_core
import feedback_transformer


def test_version_matches_core():
    assert feedback_transformer.__version__ == attention_core.__version__
