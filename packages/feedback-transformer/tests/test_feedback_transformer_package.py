"""The package installs, imports and moves in lockstep with attention-core; its modules stay
small, and attention-core carries nothing of this model."""

import ast
import re
from pathlib import Path

import pytest
import torch

import attention_core
import feedback_transformer
from feedback_transformer import FeedbackTransformer, _inference_window, _window_chain

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


@pytest.mark.parametrize("chains", [True, False])
def test_inference_takes_the_fewer_ops_window(monkeypatch, chains):
    """Without gradients (and dropout) a forward runs each window as one step chain
    (`_window_chain.WindowChains`) or, where chains do not serve, as
    `_inference_window.window`; with gradients it runs neither."""
    calls = []

    def spy(owner, name):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(name) or original(*a, **k))

    spy(_inference_window, "window")
    spy(_window_chain.WindowChains, "__call__")
    if not chains:
        monkeypatch.setattr(_inference_window, "chain_serves", lambda *args: False)
    model = FeedbackTransformer(num_tokens=20, dim=16, depth=2, seq_len=2, mem_len=4,
                                heads=2, dim_head=8).eval()  # fmt: skip
    x = torch.randint(0, 20, (2, 7))
    with torch.no_grad():
        model(x)
    assert calls == ["__call__" if chains else "window"] * 4  # windows of 2, 2, 2, 1
    model(x)
    assert len(calls) == 4
