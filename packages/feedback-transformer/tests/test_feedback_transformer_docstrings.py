"""Every public module, class, function and method of feedback_transformer has a docstring
(the API reference is generated from them)."""

from attention_core.testing.docstrings import undocumented


def test_public_api_is_documented():
    assert undocumented("feedback_transformer") == []
