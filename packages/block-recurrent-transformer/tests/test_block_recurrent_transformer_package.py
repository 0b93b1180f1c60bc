"""The package installs, imports and moves in lockstep with attention-core."""

import attention_core
import block_recurrent_transformer


def test_version_matches_core():
    assert block_recurrent_transformer.__version__ == attention_core.__version__
