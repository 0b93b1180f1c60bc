"""The package installs, imports and moves in lockstep with attention-core; its modules stay
small, and attention-core carries nothing of this model."""

import ast
import re
from pathlib import Path

import pytest
import torch

import attention_core
import feedback_transformer
from feedback_transformer import FeedbackTransformer, _inference_window

PACKAGE = Path(feedback_transformer.__file__).parent
CORE = Path(attention_core.__file__).parent
CSRC = Path(__file__).resolve().parents[3] / "csrc"


def test_version_matches_core():
    assert feedback_transformer.__version__ == attention_core.__version__


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_modules_are_at_most_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400


def test_generation_calls_no_private_method_of_the_model():
    tree = ast.parse((PACKAGE / "generation.py").read_text())
    private = [
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in ("model", "self")
        and node.attr.startswith("_")
    ]
    assert private == []


def test_attention_core_names_no_feedback_model():
    sources = [*CORE.rglob("*.py"), *CORE.rglob("*.pyi")]
    if CSRC.is_dir():  # a source checkout
        sources += [*CSRC.glob("*.h"), *CSRC.glob("*.cpp")]
    named = [str(p) for p in sources if re.search("feedback", p.read_text(), re.IGNORECASE)]
    assert named == []
    assert not hasattr(getattr(attention_core, "_C", None), "feedback_forward_f32")


def test_inference_takes_the_fewer_ops_window(monkeypatch):
    """Without gradients (and dropout) a forward runs `_inference_window.window`, once per
    window; with gradients it does not."""
    calls = []
    original = _inference_window.window
    monkeypatch.setattr(
        _inference_window, "window", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    model = FeedbackTransformer(num_tokens=20, dim=16, depth=2, seq_len=2, mem_len=4,
                                heads=2, dim_head=8).eval()  # fmt: skip
    x = torch.randint(0, 20, (2, 7))
    with torch.no_grad():
        model(x)
    assert len(calls) == 4  # windows of 2, 2, 2, 1
    model(x)
    assert len(calls) == 4
