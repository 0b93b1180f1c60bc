"""Bad input raises ValueError/TypeError naming the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

from feedback_transformer import FeedbackMemory, FeedbackTransformer


def make(**kwargs):
    options = dict(num_tokens=10, dim=16, depth=2, seq_len=2, mem_len=4, heads=2, dim_head=8)
    options.update(kwargs)
    return FeedbackTransformer(**options)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(seq_len=0), ValueError, "seq_len must be a positive int; got 0"),
        (dict(seq_len=1.5), ValueError, "seq_len"),
        (dict(mem_len=-1), ValueError, "mem_len must be a non-negative int; got -1"),
        (dict(seq_len=1, mem_len=0), ValueError, "mem_len must be positive when seq_len=1"),
        (dict(dim=0), ValueError, "dim must be a positive int"),
        (dict(attn_dropout=1.0), ValueError, r"attn_dropout must be a probability in \[0, 1\)"),
        (dict(keep_last_hidden="yes"), TypeError, "keep_last_hidden must be a bool"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        make(**kwargs)


def test_token_errors():
    model = make()
    with pytest.raises(ValueError, match=r"token ids in \[0, 10\); got values in \[0, 10\]"):
        model(torch.tensor([[0, 10]]))
    with pytest.raises(ValueError, match=r"token ids in \[0, 10\); got values in \[-1, 3\]"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="x must be an integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="n >= 1"):
        model(torch.zeros(2, 0, dtype=torch.long))


def test_memory_from_another_model():
    x = torch.zeros(2, 3, dtype=torch.long)
    _, deeper = make(depth=3)(x, return_memory=True)
    with pytest.raises(ValueError, match=r"memory comes from a model with .* = \(16, 3, 2, 8\)"):
        make()(x, memory=deeper)
    _, wider = make(heads=4)(x, return_memory=True)
    with pytest.raises(ValueError, match="memory"):
        make()(x, memory=wider)
    # shapes alone (a plain tuple): heads, dim_head, batch are checked
    keys = torch.zeros(2, 2, 3, 4)
    with pytest.raises(ValueError, match=r"memory.keys must have shape .* = \(2, 2, m, 8\)"):
        make()(x, memory=(keys, keys))
    good = torch.zeros(2, 2, 3, 8)
    with pytest.raises(ValueError, match="same shape"):
        make()(x, memory=(good, torch.zeros(2, 2, 2, 8)))
    with pytest.raises(TypeError, match="memory must be a FeedbackMemory"):
        make()(x, memory=good)
    with pytest.raises(TypeError, match="dtype"):
        make()(x, memory=FeedbackMemory(good.double(), good.double()))


@pytest.mark.parametrize(
    ("other", "source"),
    [(dict(depth=3), r"\(16, 3, 2, 8\)"), (dict(dim=32), r"\(32, 2, 2, 8\)")],
)
def test_plain_tuple_memory_from_another_model(other, source):
    """``tuple(memory)`` of a model of another depth or width (same memory shape) is refused
    like the FeedbackMemory itself; the model's own memory as a tuple still works."""
    x = torch.zeros(2, 3, dtype=torch.long)
    _, foreign = make(**other)(x, return_memory=True)
    with pytest.raises(ValueError, match=r"memory comes from a model with .* = " + source):
        make()(x, memory=tuple(foreign))
    with pytest.raises(ValueError, match=r"memory comes from a model with .* = " + source):
        make()(x, memory=list(foreign))
    model = make()
    _, own = model(x, return_memory=True)
    assert model(x, memory=tuple(own)).shape == (2, 3, 10)
    with pytest.raises(ValueError, match="keys and values come from models with"):
        model(x, memory=(own.keys, foreign.values))


def test_context_errors():
    x = torch.zeros(2, 3, dtype=torch.long)
    cross = make(cross_attend=True)
    with pytest.raises(ValueError, match="context is required"):
        cross(x)
    with pytest.raises(
        ValueError, match=r"context must have shape \(b, s, dim\) = \(2, s >= 1, 16\)"
    ):
        cross(x, context=torch.zeros(2, 5, 8))
    with pytest.raises(ValueError, match="context must have 3 dimensions"):
        cross(x, context=torch.zeros(2, 16))
    with pytest.raises(ValueError, match=r"context_mask must have shape \(b, s\) = \(2, 5\)"):
        cross(x, context=torch.zeros(2, 5, 16), context_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"context_mask must have dtype torch\.bool"):
        cross(x, context=torch.zeros(2, 5, 16), context_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="cross_attend=True"):
        make()(x, context=torch.zeros(2, 5, 16))


def test_reference_without_context():
    # the paper path called directly on a cross attention model without the context's keys
    # and values: a clear error (it used to be "argument after * must be an iterable")
    from feedback_transformer.reference import feedback_forward

    cross = make(cross_attend=True)
    h = cross.token_emb(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="context is required"):
        feedback_forward(cross, h)


def test_step_errors():
    model = make()
    _, state = model.prefill(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="state must be a FeedbackState"):
        model.step(torch.zeros(2, dtype=torch.long), None)
    with pytest.raises(ValueError, match=r"tokens must have shape \(b,\) = \(2,\)"):
        model.step(torch.zeros(3, dtype=torch.long), state)
    with pytest.raises(ValueError, match="token ids"):
        model.step(torch.full((2,), 99), state)
    with pytest.raises(ValueError, match="another model"):
        make(depth=3).step(torch.zeros(2, dtype=torch.long), state)
    with pytest.raises(TypeError, match="detach_memory must be a bool"):
        model(torch.zeros(2, 3, dtype=torch.long), detach_memory=None)
