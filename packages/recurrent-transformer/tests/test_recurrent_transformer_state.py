"""States: saving and loading resumes a stream to identical outputs, moving and detaching, the
key/value cache's capacity doubling, copy-on-write when an old state is reused, and inference
mode."""

from __future__ import annotations

import io

import pytest
import torch

from attention_core.testing import assert_close
from recurrent_transformer.builders import RecurrentDecoderBuilder, RecurrentEncoderBuilder
from recurrent_transformer.state import KVCache, LinearState, TransformerState


def encoder(attention_type, **extra):
    torch.manual_seed(0)
    return (
        RecurrentEncoderBuilder.from_kwargs(
            attention_type=attention_type,
            n_layers=2,
            n_heads=2,
            query_dimensions=4,
            value_dimensions=4,
            feed_forward_dimensions=16,
            **extra,
        )
        .get()
        .eval()
    )


def run(model, xs, state=None):
    outputs = []
    with torch.no_grad():
        for x in xs:
            y, state = model(x, state=state)
            outputs.append(y)
    return torch.stack(outputs), state


def roundtrip(obj, weights_only):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=weights_only)


# save / load


@pytest.mark.parametrize("weights_only", [True, False], ids=["weights_only", "pickle"])
@pytest.mark.parametrize(
    "attention_type,extra",
    [
        ("linear", {}),
        ("full", {}),
        ("local", {"local_context": 4}),
        ("aft-simple", {}),
        ("conditional-full:linear", {"length_limit": 3}),
    ],
    ids=["linear", "full", "local", "aft-simple", "conditional-full"],
)
def test_saved_state_resumes_to_identical_outputs(attention_type, extra, weights_only):
    model = encoder(attention_type, **extra)
    xs = torch.randn(9, 3, 8)
    expected, _ = run(model, xs)
    head, state = run(model, xs[:5])
    loaded = roundtrip(state, weights_only)
    assert type(loaded) is TransformerState
    tail, _ = run(model, xs[5:], loaded)
    torch.testing.assert_close(torch.cat([head, tail]), expected, rtol=0, atol=0)


def test_decoder_state_roundtrip():
    torch.manual_seed(0)
    model = (
        RecurrentDecoderBuilder.from_kwargs(
            n_layers=1,
            n_heads=2,
            query_dimensions=4,
            value_dimensions=4,
            cross_attention_type="full",
        )
        .get()
        .eval()
    )
    memory = torch.randn(2, 5, 8)
    with torch.no_grad():
        _, state = model(torch.randn(2, 8), memory)
        x = torch.randn(2, 8)
        expected, _ = model(x, memory, state=state)
        resumed, _ = model(x, None, state=roundtrip(state, True))
    torch.testing.assert_close(resumed, expected, rtol=0, atol=0)


def test_saved_cache_is_trimmed_to_its_length():
    cache = KVCache.from_tensors(torch.randn(1, 2, 5, 3), torch.randn(1, 2, 5, 3), capacity=64)
    loaded = roundtrip(cache, True)
    assert loaded.length == 5 and loaded.capacity == 5
    assert_close("keys", loaded.keys, cache.keys)
    grown = loaded.append(torch.randn(1, 2, 1, 3), torch.randn(1, 2, 1, 3))
    assert grown.length == 6 and grown.capacity == 16


# moving, detaching, cloning


def test_to_detach_clone():
    model = encoder("full")
    _, state = run(model, torch.randn(3, 2, 8))
    double = state.to(torch.float64)
    assert double.dtype == torch.float64 and state.dtype == torch.float32
    assert double[0].length == 3
    assert state.to("cpu")[0].key_buffer is state[0].key_buffer  # no-op moves share memory
    assert state.to(device="cpu", dtype=torch.float64).dtype == torch.float64
    assert state.batch_size == 2 and state.device == torch.device("cpu")
    clone = state.clone()
    assert clone[0].key_buffer.data_ptr() != state[0].key_buffer.data_ptr()
    with pytest.raises(TypeError, match="only floating dtypes"):
        state.to(torch.int64)
    _, grad_state = model(torch.randn(2, 8), state=None)
    assert grad_state[0].key_buffer.requires_grad
    assert not grad_state.detach()[0].key_buffer.requires_grad


def test_moved_state_keeps_working():
    model = encoder("linear")
    xs = torch.randn(4, 2, 8, dtype=torch.float64)
    expected, _ = run(model.double(), xs)
    _, state = run(model.float(), xs[:2].float())
    tail, _ = run(model.double(), xs[2:], state.to(torch.float64))
    assert_close("after .to(float64)", tail, expected[2:], rtol=1e-5, atol=1e-6)


# the key/value cache


def test_cache_capacity_doubles():
    model = encoder("full")
    state, capacities = None, []
    with torch.no_grad():
        for _ in range(40):
            _, state = model(torch.randn(2, 8), state=state)
            capacities.append(state[0].capacity)
    assert capacities[:16] == [16] * 16
    assert capacities[16:32] == [32] * 16
    assert capacities[32:] == [64] * 8
    assert state[0].length == 40 and state[0].keys.shape == (2, 2, 40, 4)


def test_cache_appends_in_place_between_doublings():
    cache = KVCache.empty(1, 1, 2, 2, capacity=16)
    buffers = []
    with torch.no_grad():
        for _ in range(16):
            cache = cache.append(torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2))
            buffers.append(cache.key_buffer.data_ptr())
        assert len(set(buffers)) == 1
        cache = cache.append(torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3, 2))
    assert cache.capacity == 32 and cache.length == 19


def feature_major(cache: KVCache) -> bool:
    """Whether the keys are stored as the attention step streams them: each feature
    contiguous over the positions."""
    return cache.key_buffer.transpose(2, 3).is_contiguous()


def test_cache_keys_stay_feature_major():
    cache = KVCache.empty(2, 3, 4, 5, capacity=16)
    assert feature_major(cache)
    with torch.no_grad():
        for _ in range(20):  # in place, then through a doubling
            cache = cache.append(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 5))
            assert feature_major(cache)
    assert cache.capacity == 32
    for moved in (cache.clone(), cache.to(torch.float64), cache.detach()):
        assert feature_major(moved)
    assert feature_major(KVCache.from_tensors(cache.keys, cache.values))


def test_loaded_cache_regrows_feature_major():
    model = encoder("full")
    xs = torch.randn(6, 3, 8)
    expected, _ = run(model, xs)
    head, state = run(model, xs[:4])
    loaded = roundtrip(state, weights_only=True)
    assert loaded[0].capacity == loaded[0].length == 4  # saved trimmed, row-major
    tail, resumed = run(model, xs[4:], loaded)
    assert all(feature_major(layer) for layer in resumed)
    torch.testing.assert_close(torch.cat([head, tail]), expected, rtol=0, atol=0)


def test_reusing_an_old_cache_copies_instead_of_overwriting():
    a = KVCache.empty(1, 1, 1, 1, capacity=8)
    k = lambda value: torch.full((1, 1, 1, 1), float(value))  # noqa: E731
    with torch.no_grad():
        b = a.append(k(1), k(1))
        c = b.append(k(2), k(2))
        branch = b.append(k(3), k(3))  # b's buffer was already extended by c
    assert c.keys.flatten().tolist() == [1.0, 2.0]
    assert branch.keys.flatten().tolist() == [1.0, 3.0]
    assert branch.key_buffer.data_ptr() != c.key_buffer.data_ptr()


def test_cache_concatenates_while_autograd_records():
    k = torch.randn(1, 1, 1, 2, requires_grad=True)
    cache = KVCache.empty(1, 1, 2, 2).append(k, k)
    cache = cache.append(k * 2, k * 2)
    (cache.keys.sum() + cache.values.sum()).backward()
    assert_close("grad", k.grad, torch.full_like(k, 6.0))


def test_inference_mode_states_can_be_stepped_outside_inference_mode():
    model = encoder("full")
    with torch.inference_mode():
        _, state = model(torch.randn(2, 8))
    with torch.no_grad():
        expected, _ = model(torch.ones(2, 8), state=state.clone())
        y, state = model(torch.ones(2, 8), state=state)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_from_tensors_and_capacity_errors():
    keys = torch.randn(2, 3, 5, 4)
    cache = KVCache.from_tensors(keys, keys)
    assert cache.capacity == 16 and cache.length == 5
    with pytest.raises(ValueError, match="capacity must be at least the length 5; got 3"):
        KVCache.from_tensors(keys, keys, capacity=3)


def test_linear_state_is_constant_size():
    model = encoder("linear")
    _, short = run(model, torch.randn(2, 3, 8))
    _, long = run(model, torch.randn(50, 3, 8))
    assert isinstance(long[0], LinearState)
    assert [t.shape for t in short.tensors()] == [t.shape for t in long.tensors()]
