"""Token-by-token decoding (prefill/step, generate, stream) is the exact seq_len=1 model:
its logits equal forward of a seq_len=1 model with the same weights, whatever seq_len the
model was built with, and a step neither grows nor reallocates the memory."""

from __future__ import annotations

import pytest
import torch

from attention_core.generation import StepModel
from feedback_transformer import FeedbackState, FeedbackTransformer


def assert_close(name, actual, expected, **tolerances):
    """``torch.testing.assert_close`` (float64: rtol 1e-7, atol 1e-7) naming the quantity."""
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{name}: {m}", **tolerances)


VOCAB, DIM = 19, 16


def make(seq_len=2, mem_len=5, cross_attend=False, seed=0):
    torch.manual_seed(seed)
    model = FeedbackTransformer(
        num_tokens=VOCAB,
        dim=DIM,
        depth=2,
        seq_len=seq_len,
        mem_len=mem_len,
        heads=2,
        dim_head=8,
        cross_attend=cross_attend,
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def exact_copy(model):
    """The same weights in a seq_len=1 model (the paper's exact model)."""
    exact = FeedbackTransformer(
        num_tokens=VOCAB,
        dim=DIM,
        depth=2,
        seq_len=1,
        mem_len=model.mem_len,
        heads=2,
        dim_head=8,
        cross_attend=model.cross_attend,
    ).double()
    exact.load_state_dict(model.state_dict())
    return exact.eval()


@pytest.mark.parametrize(
    ("seq_len", "mem_len", "cross"),
    [(1, 5, False), (2, 3, False), (3, 16, True), (2, 1, True)],
    ids=["W1", "W2-ring-wraps", "W3-cross", "W2-M1-cross"],
)
def test_steps_equal_seq_len_1_forward(seq_len, mem_len, cross):
    model = make(seq_len, mem_len, cross)
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    kwargs = {}
    if cross:
        context = torch.randn(2, 4, DIM, dtype=torch.float64)
        kwargs = dict(
            context=context, context_mask=torch.tensor([[1, 0, 1, 1], [1, 1, 1, 0]]).bool()
        )
    expected, expected_memory = exact_copy(model)(x, return_memory=True, **kwargs)
    logits, state = model.prefill(x[:, :4], **kwargs)
    assert isinstance(state, FeedbackState)
    assert_close("prefill", logits, expected[:, 3])
    for t in range(4, 12):
        logits, state = model.step(x[:, t], state)
        assert_close(f"step {t}", logits, expected[:, t])
    assert state.steps == 12
    assert_close("memory keys", state.memory.keys, expected_memory.keys)
    assert_close("memory values", state.memory.values, expected_memory.values)


def test_prefill_continues_a_memory():
    model = make(seq_len=1, mem_len=8)
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    expected = model(x)
    _, memory = model(x[:, :5], return_memory=True)
    logits, state = model.prefill(x[:, 5:7], memory=memory)
    assert_close("prefill", logits, expected[:, 6])
    logits, _ = model.step(x[:, 7], state)
    assert_close("step", logits, expected[:, 7])


def test_step_writes_the_memory_in_place():
    """Constant cost per token: the ring buffer is allocated once and never grows."""
    model = make(seq_len=2, mem_len=4)
    _, state = model.prefill(torch.randint(0, VOCAB, (2, 3)))
    pointers = (state.ring.keys.data_ptr(), state.ring.values.data_ptr())
    shape = state.ring.keys.shape
    for t in range(20):
        _, state = model.step(torch.full((2,), t % VOCAB), state)
        assert state.memory.keys.shape[2] == min(4, 3 + t + 1)
    assert (state.ring.keys.data_ptr(), state.ring.values.data_ptr()) == pointers
    assert state.ring.keys.shape == shape


def test_generate_is_greedy_decoding_of_the_exact_model():
    model = make(seq_len=2, mem_len=6)
    exact = exact_copy(model)
    prompt = torch.randint(0, VOCAB, (2, 3), generator=torch.Generator().manual_seed(5))
    out = model.generate(prompt, 6, temperature=0.0)
    assert out.shape == (2, 9) and torch.equal(out[:, :3], prompt)
    sequence = prompt
    for _ in range(6):  # the slow way: rerun the whole sequence for every new token
        next_token = exact(sequence)[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat((sequence, next_token), dim=1)
    assert torch.equal(out, sequence)
    streamed = torch.stack(list(model.stream(prompt, 6, temperature=0.0)), dim=1)
    assert torch.equal(streamed, sequence[:, 3:])


def test_generate_with_context_and_sampling_options():
    model = make(seq_len=1, mem_len=4, cross_attend=True)
    context = torch.randn(3, 2, DIM, dtype=torch.float64)
    prompt = torch.randint(0, VOCAB, (3, 2))
    generator = torch.Generator().manual_seed(0)
    out = model.generate(prompt, 5, context=context, top_k=3, generator=generator)
    assert out.shape == (3, 7) and out.dtype == torch.int64
    assert ((out >= 0) & (out < VOCAB)).all()


def test_model_is_a_step_model():
    assert isinstance(make(), StepModel)
