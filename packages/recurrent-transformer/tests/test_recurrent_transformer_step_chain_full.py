"""The encoder's step as one chain call with softmax attention over a `KVCache`: equal in
float64 to the layer-by-layer step while the caches grow (in place and by reallocation), are
shared with older states, loaded, mixed with linear layers; the caches it returns behave as
the layers' do."""

import copy
import gc
import io
import weakref

import pytest
import torch

import recurrent_transformer.transformers as transformers
from attention_core.events import AttentionEvent, EventDispatcher
from attention_core.testing import assert_close
from recurrent_transformer.builders import RecurrentEncoderBuilder
from recurrent_transformer.state import KVCache, LinearState


def encoder(attention_type="full", seed=0, layers=3, **kwargs):
    torch.manual_seed(seed)
    model = RecurrentEncoderBuilder.from_kwargs(
        n_layers=layers, n_heads=2, query_dimensions=4, value_dimensions=4,
        feed_forward_dimensions=20, attention_type=attention_type, **kwargs,
    ).get()  # fmt: skip
    with torch.no_grad():  # parameters far from their initialisation
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.double().eval()


def mixed_encoder():
    """Layers of softmax and of linear attention in one model."""
    model, linear = encoder("full"), encoder("linear", seed=1)
    model.layers[1] = linear.layers[1]
    return model


def run(model, xs, state=None, chained=True, monkeypatch=None):
    with monkeypatch.context() as m:
        if not chained:
            m.setattr(transformers, "chained_step", lambda *args: None)
        outputs = []
        with torch.no_grad():
            for x in xs:
                y, state = model(x, state=state)
                outputs.append(y)
    return torch.stack(outputs), state


def assert_same_state(a, b):
    for s, t in zip(a, b):
        assert type(s) is type(t)
        if isinstance(s, KVCache):
            assert s.length == t.length
            assert_close("keys", s.keys, t.keys, rtol=1e-10, atol=1e-10)
            assert_close("values", s.values, t.values, rtol=1e-10, atol=1e-10)
        else:
            assert_close("S", s.S, t.S, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("make", [encoder, mixed_encoder], ids=["full", "full+linear"])
@pytest.mark.parametrize("rows", [1, 3])
def test_the_chain_equals_the_layers_while_the_caches_grow(make, rows, chain_calls, monkeypatch):
    model = make()
    xs = torch.randn(40, rows, 8, dtype=torch.float64)  # past capacities 16 and 32
    chained, state = run(model, xs, monkeypatch=monkeypatch)
    layers, layers_state = run(model, xs, chained=False, monkeypatch=monkeypatch)
    assert_close("y", chained, layers, rtol=1e-10, atol=1e-10)
    assert_same_state(state, layers_state)
    assert len(chain_calls) == 40
    caches = [s for s in state if isinstance(s, KVCache)]
    assert caches and all(c.length == 40 and c.capacity == 64 for c in caches)
    assert all(c.key_buffer.stride(2) == 1 for c in caches)  # still feature-major


def test_older_states_stay_valid_and_branch(chain_calls, monkeypatch):
    """A state stepped twice (two continuations of one prefix) gives each its own history:
    the second continuation's cache is copied before it is written, as KVCache.append does."""
    model = encoder()
    xs = torch.randn(5, 2, 8, dtype=torch.float64)
    _, state = run(model, xs[:3], monkeypatch=monkeypatch)
    first, first_state = run(model, xs[3:], state, monkeypatch=monkeypatch)
    other = torch.randn(2, 2, 8, dtype=torch.float64)
    second, second_state = run(model, other, state, monkeypatch=monkeypatch)
    again, _ = run(model, xs[3:], state, monkeypatch=monkeypatch)
    expected_first, _ = run(model, xs[3:], state, chained=False, monkeypatch=monkeypatch)
    expected_second, _ = run(model, other, state, chained=False, monkeypatch=monkeypatch)
    assert_close("first", first, expected_first, rtol=1e-10, atol=1e-10)
    assert_close("second", second, expected_second, rtol=1e-10, atol=1e-10)
    assert_close("again", again, expected_first, rtol=1e-10, atol=1e-10)
    assert all(s.length == 5 for s in first_state) and all(s.length == 5 for s in second_state)
    assert all(s.length == 3 for s in state)


def test_saved_deep_copied_and_fast_transformers_states_continue(chain_calls, monkeypatch):
    model = encoder()
    xs = torch.randn(4, 2, 8, dtype=torch.float64)
    expected, _ = run(model, xs, monkeypatch=monkeypatch)
    _, state = run(model, xs[:2], monkeypatch=monkeypatch)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    as_lists = [[s.keys.clone(), s.values.clone()] for s in state]  # fast-transformers' form
    for start in (loaded, copy.deepcopy(state), as_lists):
        got, _ = run(model, xs[2:], start, monkeypatch=monkeypatch)
        assert_close("continued", got, expected[2:], rtol=1e-10, atol=1e-10)


def test_float32_steps_match_the_layers(chain_calls, monkeypatch):
    model = encoder().float()
    xs = torch.randn(20, 2, 8)
    chained, _ = run(model, xs, monkeypatch=monkeypatch)
    layers, _ = run(model, xs, chained=False, monkeypatch=monkeypatch)
    assert_close("y", chained, layers, rtol=1e-5, atol=1e-5)
    assert len(chain_calls) == 20


def test_listeners_dropout_grad_and_softmax_temp(chain_calls, monkeypatch):
    xs = torch.randn(3, 2, 8, dtype=torch.float64)
    events = []
    listened = encoder(event_dispatcher=EventDispatcher())
    listened.event_dispatcher.listen(AttentionEvent, events.append)
    run(listened, xs, monkeypatch=monkeypatch)
    assert len(events) == 9 and not chain_calls  # 3 layers x 3 steps, on the layers' path
    dropped = encoder(attention_dropout=0.5).train()
    for layer in dropped.layers:
        layer.dropout.p = 0.0  # only the attention's dropout is on
    run(dropped, xs, monkeypatch=monkeypatch)
    assert not chain_calls
    model = encoder()
    model(xs[0])  # grad mode on
    assert not chain_calls
    tempered = encoder(softmax_temp=0.7)
    chained, _ = run(tempered, xs, monkeypatch=monkeypatch)
    layers, _ = run(tempered, xs, chained=False, monkeypatch=monkeypatch)
    assert_close("y", chained, layers, rtol=1e-10, atol=1e-10)
    assert len(chain_calls) == 3


def test_caches_of_other_lengths_take_the_layers(chain_calls, monkeypatch):
    """Caches of different lengths (states put together by hand) take the layers' path."""
    model = encoder()
    xs = torch.randn(3, 2, 8, dtype=torch.float64)
    _, long = run(model, xs, monkeypatch=monkeypatch)
    _, short = run(model, xs[:1], monkeypatch=monkeypatch)
    calls = len(chain_calls)
    mixed = [long[0], short[1], long[2]]
    got, _ = run(model, xs[:1], mixed, monkeypatch=monkeypatch)
    expected, _ = run(model, xs[:1], mixed, chained=False, monkeypatch=monkeypatch)
    assert_close("y", got, expected, rtol=1e-10, atol=1e-10)
    assert len(chain_calls) == calls
    assert isinstance(long[0], KVCache) and not isinstance(long[0], LinearState)


def test_the_chain_and_its_buffers_go_with_the_states(chain_calls, monkeypatch):
    """A chain over caches lives on their claim, not in the model's table: dropping the states
    frees the buffers (and the chain); a deep copy of a state does not copy the chain."""
    model = encoder()
    xs = torch.randn(3, 2, 8, dtype=torch.float64)
    _, state = run(model, xs, monkeypatch=monkeypatch)
    claim = state[0]._claim
    assert claim.chain is not None
    assert getattr(copy.deepcopy(state[0])._claim, "chain", None) is None
    buffer = weakref.ref(state[0].key_buffer)
    chain = weakref.ref(claim.chain[3])
    del state, claim
    gc.collect()
    assert buffer() is None and chain() is None
    assert len(chain_calls) == 3
