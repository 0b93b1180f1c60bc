"""Findings of a review of the decoder's step chain (``recurrent_transformer._decoder_chain``),
fixed, each with its test: a kept memory state must not keep the self-attention caches of
dropped states alive, two continuations of one memory state keep their own chains, and a
memory given longer storage is read as the layers read it."""

import contextlib
import gc
import weakref

import torch

import recurrent_transformer._decoder_chain as decoder_chain
import recurrent_transformer.transformers as transformers
from attention_core.testing import assert_close
from recurrent_transformer.builders import RecurrentDecoderBuilder


def decoder(self_type="full"):
    torch.manual_seed(0)
    model = RecurrentDecoderBuilder.from_kwargs(
        n_layers=2, n_heads=2, query_dimensions=4, value_dimensions=4,
        feed_forward_dimensions=20, self_attention_type=self_type,
    ).get()  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.double().eval()


@contextlib.contextmanager
def layers_only(monkeypatch, chained):
    with monkeypatch.context() as patch:
        if not chained:
            patch.setattr(transformers, "chained_decoder_step", lambda *args: None)
        yield


def test_a_kept_memory_state_does_not_keep_the_caches_alive():
    model = decoder()
    x, memory = torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        _, state = model(x, memory)
        kept = state[0].cross_attention  # kept to sample again from the same memory
        for _ in range(20):
            _, state = model(x, None, state=state)
    buffers = [weakref.ref(s.self_attention.key_buffer) for s in state]
    del state
    gc.collect()
    assert kept is not None
    assert all(b() is None for b in buffers)  # as on the layers' path


def test_two_continuations_of_one_memory_keep_their_chains(monkeypatch):
    made = []
    make = decoder_chain._make_chain
    monkeypatch.setattr(decoder_chain, "_make_chain", lambda *a: made.append(1) or make(*a))
    model = decoder()
    x, memory = torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        _, first = model(x, memory)
        a = b = first
        for _ in range(8):
            _, a = model(x, None, state=a)
            _, b = model(x, None, state=b)
    assert len(made) <= 4  # 16 steps of two sequences: a chain each, remade on growth


def test_a_memory_given_longer_storage_is_read_as_the_layers_read_it(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 8, generator=g, dtype=torch.float64)
    memory = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    longer = [torch.randn(3, 2, 9, 4, generator=g, dtype=torch.float64) for _ in range(4)]
    outputs = []
    for chained in (False, True):
        model = decoder("causal-linear")
        with layers_only(monkeypatch, chained), torch.no_grad():
            _, state = model(x[0], memory)
            _, state = model(x[1], None, state=state)  # the chain is made for S = 5
            for i, layer_state in enumerate(state):
                layer_state.cross_attention.keys.data = longer[2 * i].clone()
                layer_state.cross_attention.values.data = longer[2 * i + 1].clone()
            outputs.append(model(x[2], None, state=state)[0])
    assert_close("y", outputs[1], outputs[0], rtol=1e-10, atol=1e-10)
