"""The encoder's step chain with softmax attention where a review found defects (fixed): one
cache given to every layer, a key buffer given new storage, the buffers of dropped states. The
layer-by-layer step (``chained_step`` patched to ``None``) is the reference."""

import gc
import weakref

import torch

import recurrent_transformer.transformers as transformers
from recurrent_transformer.builders import RecurrentEncoderBuilder
from recurrent_transformer.state import KVCache


def encoder(layers=3):
    torch.manual_seed(0)
    model = RecurrentEncoderBuilder.from_kwargs(
        n_layers=layers, n_heads=2, query_dimensions=4, value_dimensions=4,
        feed_forward_dimensions=20, attention_type="full",
    ).get()  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.double().eval()


def run(model, xs, state, chained, monkeypatch, between=None):
    with monkeypatch.context() as m, torch.no_grad():
        if not chained:
            m.setattr(transformers, "chained_step", lambda *args: None)
        outputs = []
        for i, x in enumerate(xs):
            y, state = model(x, state=state)
            outputs.append(y)
            if between is not None:
                between(i, state)
    return torch.stack(outputs), state


def test_one_empty_cache_given_to_every_layer(monkeypatch):
    """``[KVCache.empty(...)] * n_layers``: the layers append to the one cache in turn (the
    second copies it); the chain writes every layer's key into the same slot."""
    model = encoder()
    xs = torch.randn(4, 2, 8, dtype=torch.float64)
    results = [
        run(model, xs, [KVCache.empty(2, 2, 4, 4, dtype=torch.float64)] * 3, chained, monkeypatch)
        for chained in (True, False)
    ]
    (y_chain, s_chain), (y_layers, s_layers) = results
    torch.testing.assert_close(y_chain, y_layers, rtol=1e-9, atol=1e-9)
    for a, b in zip(s_chain, s_layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-9, atol=1e-9)


def test_a_key_buffer_given_new_storage_receives_the_next_keys(monkeypatch):
    """``state.key_buffer.data = ...`` keeps the tensor (so the cached chain is reused); the
    chain must write the next keys into the new storage, as the layers do."""
    model = encoder()
    xs = torch.randn(5, 2, 8, dtype=torch.float64)

    def new_storage(i, state):
        if i == 1:
            for cache in state:
                cache.key_buffer.data = cache.key_buffer.clone()

    states = [run(model, xs, None, c, monkeypatch, new_storage)[1] for c in (True, False)]
    for a, b in zip(*states):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-9, atol=1e-9)


def test_dropped_states_free_their_cache_buffers(monkeypatch):
    """Once the caller drops the states, their buffers are freed (the layer path's are)."""
    model = encoder(layers=1)
    _, state = run(model, torch.randn(3, 2, 8, dtype=torch.float64), None, True, monkeypatch)
    buffer = weakref.ref(state[0].key_buffer)
    del state
    gc.collect()
    assert buffer() is None
