"""Token-by-token decoding (prefill/step, generate, stream) computes forward's function:
teacher-forced through the step protocol, a model's logits and memory equal those of its
forward, for any seq_len (windows of seq_len tokens counted from the prompt's start), and a
step neither grows nor reallocates the memory."""

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


def teacher_forced(model, x, prompt, **kwargs):
    """Logits ``(b, n - prompt + 1, V)`` of positions ``prompt - 1 .. n - 1`` of ``x`` through
    prefill of ``x[:, :prompt]`` and one step per later token, and the final state."""
    logits, state = model.prefill(x[:, :prompt], **kwargs)
    out = [logits]
    for t in range(prompt, x.shape[1]):
        logits, state = model.step(x[:, t], state)
        out.append(logits)
    return torch.stack(out, dim=1), state


@pytest.mark.parametrize(
    ("seq_len", "mem_len", "prompt", "cross"),
    [
        (1, 5, 4, False),
        (2, 3, 4, False),
        (2, 6, 1, False),
        (2, 1, 3, True),
        (3, 16, 5, True),
        (3, 0, 4, False),
        (8, 16, 1, False),
        (8, 16, 11, False),
        (8, 5, 8, False),
    ],
    ids=[
        "W1",
        "W2-ring-wraps",
        "W2-prompt-1",
        "W2-M1-cross",
        "W3-cross",
        "W3-no-memory",
        "W8-prompt-1",
        "W8-prompt-mid-window",
        "W8-M5-prompt-one-window",
    ],
)
def test_steps_equal_forward(seq_len, mem_len, prompt, cross):
    """Teacher forcing through prefill/step gives forward's logits at every position and
    its memory, whatever window the prompt ends in."""
    model = make(seq_len, mem_len, cross)
    x = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(3))
    kwargs = {}
    if cross:
        context = torch.randn(2, 4, DIM, dtype=torch.float64)
        kwargs = dict(
            context=context, context_mask=torch.tensor([[1, 0, 1, 1], [1, 1, 1, 0]]).bool()
        )
    expected, expected_memory = model(x, return_memory=True, **kwargs)
    logits, state = teacher_forced(model, x, prompt, **kwargs)
    assert isinstance(state, FeedbackState)
    assert_close("logits", logits, expected[:, prompt - 1 :])
    assert state.steps == 21
    assert_close("memory keys", state.memory.keys, expected_memory.keys)
    assert_close("memory values", state.memory.values, expected_memory.values)


@pytest.mark.parametrize("seq_len", [2, 8])
def test_windowed_models_decode_their_own_function_not_the_token_by_token_one(seq_len):
    """With seq_len > 1 the windows make a function other than seq_len=1's (so a test that
    compared decoding with a seq_len=1 copy would not notice a decoder that ignores them)."""
    model = make(seq_len, 16)
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(6))
    logits, _ = teacher_forced(model, x, 1)
    assert_close("logits", logits, model(x))
    differs = (exact_copy(model)(x)[:, 1:] - logits[:, 1:]).abs().amax()
    assert differs > 1e-3, f"seq_len={seq_len} and seq_len=1 agree to {float(differs):.1e}"


def test_steps_equal_forward_in_float32():
    """The decoding path keeps float32's precision (no drift over a ring that wraps)."""
    torch.manual_seed(1)
    model = FeedbackTransformer(
        num_tokens=VOCAB, dim=32, depth=3, seq_len=8, mem_len=12, heads=2, dim_head=16
    ).eval()
    x = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(x)
    logits, _ = teacher_forced(model, x, 5)
    assert_close("logits", logits, expected[:, 4:], rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("seq_len", [1, 2, 3])
def test_generate_is_greedy_decoding_of_forward(seq_len):
    model = make(seq_len=seq_len, mem_len=6)
    prompt = torch.randint(0, VOCAB, (2, 3), generator=torch.Generator().manual_seed(5))
    out = model.generate(prompt, 6, temperature=0.0)
    assert out.shape == (2, 9) and torch.equal(out[:, :3], prompt)
    sequence = prompt
    for _ in range(6):  # the slow way: rerun the whole sequence for every new token
        next_token = model(sequence)[:, -1].argmax(-1, keepdim=True)
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


@pytest.mark.parametrize("seq_len", [1, 3])
def test_steps_return_ordinary_tensors(seq_len):
    """A step's window runs under ``torch.inference_mode``; what it returns and keeps must
    not be inference tensors: callers scale logits in place and train on the memory."""
    model = make(seq_len=seq_len, mem_len=4)
    logits, state = model.prefill(torch.randint(0, VOCAB, (2, 2)))
    for t in range(5):
        logits, state = model.step(torch.full((2,), t), state)
        assert not logits.is_inference()
        logits.div_(2.0)  # raises for an inference tensor outside inference mode
    memory = state.memory
    assert not memory.keys.is_inference() and not memory.values.is_inference()
    assert not state.ring.keys.is_inference() and not state.window.is_inference()
    if seq_len > 1:  # 2 + 5 tokens: an incomplete window of 1, whose memory the state keeps
        assert state.window_memory is not None
        assert not any(t.is_inference() for t in state.window_memory)
    x = torch.randint(0, VOCAB, (2, 3))
    model.train()
    loss = model(x, memory=memory).sum()  # the memory feeds a training step
    loss.backward()


@pytest.mark.parametrize("seq_len", [1, 3])
def test_a_compiled_step_continues_eager_steps(seq_len):
    """Eager steps run under inference mode; what they leave in the state must serve a later
    step under torch.compile (which runs without it)."""
    model = make(seq_len=seq_len, mem_len=5)
    x = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(6))
    expected, _ = teacher_forced(model, x, 2)
    logits, state = model.prefill(x[:, :2])
    out = [logits]
    for t in range(2, 5):
        logits, state = model.step(x[:, t], state)
        out.append(logits)
    compiled = torch.compile(model.step, backend="eager")
    for t in range(5, 8):
        logits, state = compiled(x[:, t], state)
        out.append(logits)
    assert_close("eager then compiled steps", torch.stack(out, dim=1), expected)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.layers[0].to_out.weight.add_(0.1),
        lambda m: m.to_kv.weight.mul_(2.0),
        lambda m: m.load_state_dict(m.state_dict()),
        lambda m: setattr(m.layers[1].to_q.weight, "data", m.layers[1].to_q.weight.clone()),
    ],
    ids=["in-place", "shared-kv", "load_state_dict", "new-data"],
)
def test_a_step_refuses_parameters_changed_since_prefill(change):
    """The state holds copies of some weights (the scaled queries) and reads others: after a
    change of the parameters a step would mix old and new weights, so it refuses."""
    model = make(seq_len=2, mem_len=4)
    tokens = torch.randint(0, VOCAB, (2, 3))
    _, state = model.prefill(tokens)
    model.step(tokens[:, 0], state)
    with torch.no_grad():
        change(model)
    with pytest.raises(ValueError, match="changed since prefill"):
        model.step(tokens[:, 1], state)
    _, state = model.prefill(tokens)  # a new state follows the new weights
    x = torch.cat((tokens, tokens[:, :1]), dim=1)
    stepped, _ = model.step(tokens[:, 0], state)
    assert_close("step after a new prefill", stepped, model(x)[:, -1])
