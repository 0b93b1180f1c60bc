"""The decoder's step as one chain call (``recurrent_transformer._decoder_chain``): equal in
float64 to the layer-by-layer step with linear or softmax self attention and softmax cross
attention over the memory, padded or not; taken only from the second step (the first
projects the memory) and where the layers compute what the chain does; kept with the
memory's state."""

import gc
import weakref

import pytest
import torch

import recurrent_transformer.transformers as transformers
from attention_core.events import AttentionEvent, EventDispatcher
from attention_core.masking import LengthMask
from attention_core.testing import assert_close
from recurrent_transformer.builders import RecurrentDecoderBuilder
from recurrent_transformer.state import KVCache, LinearState, MemoryState


def decoder(self_type="full", cross_type="full", seed=0, **kwargs):
    torch.manual_seed(seed)
    model = RecurrentDecoderBuilder.from_kwargs(
        n_layers=2, n_heads=2, query_dimensions=4, value_dimensions=4,
        feed_forward_dimensions=20, self_attention_type=self_type,
        cross_attention_type=cross_type, **kwargs,
    ).get()  # fmt: skip
    with torch.no_grad():  # parameters far from their initialisation
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.double().eval()


def run(model, xs, memory, monkeypatch, chained=True, mask=None, state=None):
    with monkeypatch.context() as m, torch.no_grad():
        if not chained:
            m.setattr(transformers, "chained_decoder_step", lambda *args: None)
        outputs = []
        for x in xs:
            y, state = model(x, memory, memory_length_mask=mask, state=state)
            outputs.append(y)
    return torch.stack(outputs), state


@pytest.mark.parametrize("self_type", ["full", "causal-linear"])
@pytest.mark.parametrize("rows", [1, 3])
def test_the_chain_equals_the_layers(self_type, rows, chain_calls, monkeypatch):
    model = decoder(self_type)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(20, rows, 8, generator=g, dtype=torch.float64)  # past a capacity of 16
    memory = torch.randn(rows, 5, 8, generator=g, dtype=torch.float64)
    chained, state = run(model, xs, memory, monkeypatch)
    layers, layers_state = run(model, xs, memory, monkeypatch, chained=False)
    assert_close("y", chained, layers, rtol=1e-10, atol=1e-10)
    assert len(chain_calls) == 19  # every step but the first, which projects the memory
    for a, b in zip(state, layers_state):
        assert type(a.cross_attention) is MemoryState
        s, t = a.self_attention, b.self_attention
        if isinstance(s, KVCache):
            assert s.length == t.length == 20
            assert_close("keys", s.keys, t.keys, rtol=1e-10, atol=1e-10)
        else:
            assert isinstance(s, LinearState)
            assert_close("S", s.S, t.S, rtol=1e-10, atol=1e-10)
    # the chain's states continue on the layers' path
    more, _ = run(model, xs[:2], None, monkeypatch, chained=False, state=state)
    expected, _ = run(model, xs[:2], None, monkeypatch, chained=False, state=layers_state)
    assert_close("continued", more, expected, rtol=1e-10, atol=1e-10)


def test_float32_and_softmax_temp(chain_calls, monkeypatch):
    model = decoder(softmax_temp=0.6).float()
    xs, memory = torch.randn(6, 2, 8), torch.randn(2, 7, 8)
    chained, _ = run(model, xs, memory, monkeypatch)
    layers, _ = run(model, xs, memory, monkeypatch, chained=False)
    assert_close("y", chained, layers, rtol=1e-5, atol=1e-5)
    assert len(chain_calls) == 5


@pytest.mark.parametrize("self_type", ["full", "causal-linear"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_padded_memories_take_the_chain(self_type, dtype, chain_calls, monkeypatch):
    """Memories of lengths 5, 3, 1 and 0 (padding holding NaN, which must not leak): the
    chain's per-batch bias equals the layers' mask, zeros for the element without memory."""
    model = decoder(self_type).to(dtype)
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(6, 4, 8, generator=g, dtype=torch.float64).to(dtype)
    memory = torch.randn(4, 5, 8, generator=g, dtype=torch.float64).to(dtype)
    lengths = torch.tensor([5, 3, 1, 0])
    memory[torch.arange(5)[None, :] >= lengths[:, None]] = float("nan")
    mask = LengthMask(lengths, max_len=5)
    chained, state = run(model, xs, memory, monkeypatch, mask=mask)
    layers, _ = run(model, xs, memory, monkeypatch, chained=False, mask=mask)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close("padded", chained, layers, rtol=tolerance, atol=tolerance)
    assert not chained.isnan().any()
    assert len(chain_calls) == 5  # every step but the first
    assert state[0].cross_attention.key_mask is not None
    # another mask over the same memory is another chain, not the kept one's bias
    other = LengthMask(torch.tensor([2, 5, 4, 3]), max_len=5)
    memory = memory.nan_to_num(0.0)
    chained, _ = run(model, xs, memory, monkeypatch, mask=other)
    layers, _ = run(model, xs, memory, monkeypatch, chained=False, mask=other)
    assert_close("other mask", chained, layers, rtol=tolerance, atol=tolerance)


def test_other_attentions_and_listeners_take_the_layers(chain_calls, monkeypatch):
    xs, memory = torch.randn(3, 2, 8, dtype=torch.float64), torch.randn(2, 5, 8)
    memory = memory.double()
    run(decoder(cross_type="linear"), xs, memory, monkeypatch)
    events = []
    listened = decoder(event_dispatcher=EventDispatcher())
    listened.event_dispatcher.listen(AttentionEvent, events.append)
    run(listened, xs, memory, monkeypatch)
    assert events and not chain_calls


def test_the_chain_goes_with_the_memory_state(chain_calls, monkeypatch):
    model = decoder()
    xs, memory = torch.randn(3, 2, 8, dtype=torch.float64), torch.randn(2, 5, 8).double()
    _, state = run(model, xs, memory, monkeypatch)
    assert len(chain_calls) == 2
    entry = state[0].self_attention._claim.chain  # kept with the caches (softmax)
    chain, keys = weakref.ref(entry[3]), weakref.ref(state[0].cross_attention.keys)
    del state, entry
    gc.collect()
    assert chain() is None and keys() is None


@pytest.mark.parametrize("self_type", ["full", "causal-linear"])
def test_an_empty_batch_steps(self_type, chain_calls, monkeypatch):
    """A batch of no sequences steps on both paths (the heads are split with explicit widths:
    an empty batch has no size to infer)."""
    model = decoder(self_type)
    xs, memory = torch.randn(3, 0, 8, dtype=torch.float64), torch.randn(0, 5, 8).double()
    for chained in (True, False):
        y, state = run(model, xs, memory, monkeypatch, chained=chained)
        assert y.shape == (3, 0, 8) and len(state) == 2
    assert not chain_calls  # nothing to compute: the layers' path
