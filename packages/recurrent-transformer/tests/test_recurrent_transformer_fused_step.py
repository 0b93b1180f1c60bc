"""The fused inference step of the recurrent layers (``recurrent_transformer._fused_step``):
equal in float64 to the composed modules for encoders and decoders, linear and full
attention, relu and gelu; taken only without autograd, dropout or hooks."""

import pytest
import torch

import recurrent_transformer._fused_step as fused_step
import recurrent_transformer.transformers as transformers
from attention_core.residual_step import MIN_ROWS
from attention_core.testing import assert_close
from recurrent_transformer.builders import RecurrentDecoderBuilder, RecurrentEncoderBuilder

SIZES = dict(n_layers=2, n_heads=3, query_dimensions=4, value_dimensions=5,
             feed_forward_dimensions=24)  # fmt: skip


def encoder(attention, activation):
    torch.manual_seed(0)
    model = RecurrentEncoderBuilder.from_kwargs(
        attention_type=attention, activation=activation, **SIZES
    ).get()
    with torch.no_grad():  # parameters far from their initialisation
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.double().eval()


def decoder(attention, activation):
    torch.manual_seed(1)
    model = RecurrentDecoderBuilder.from_kwargs(
        self_attention_type=attention, cross_attention_type=attention, activation=activation,
        **SIZES,
    ).get()  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.double().eval()


def steps(model, xs, memory=None):
    state, outputs = None, []
    with torch.no_grad():
        for x in xs:
            if memory is None:
                y, state = model(x, state=state)
            else:
                y, state = model(x, memory, state=state)
            outputs.append(y)
    return torch.stack(outputs)


@pytest.fixture
def counted(monkeypatch):
    """Counts the fused sublayer calls."""
    calls = {"linear": 0, "feed_forward": 0}
    for name, attr in (("linear", "residual_linear"), ("feed_forward", "residual_feed_forward")):
        original = getattr(fused_step, attr)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(fused_step, attr, wrapper)
    return calls


def composed(monkeypatch):
    monkeypatch.setattr(transformers, "fused_step_enabled", lambda *args: False)


@pytest.mark.parametrize("attention", ["linear", "full"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_fused_step_equals_the_composed_step(attention, activation, counted, monkeypatch):
    model = encoder(attention, activation)
    xs = torch.randn(6, 4, 15, dtype=torch.float64)  # 4 rows: MIN_ROWS or more
    fused = steps(model, xs)
    assert counted == {"linear": 6 * 2, "feed_forward": 6 * 2}
    composed(monkeypatch)
    assert_close("y", fused, steps(model, xs), rtol=1e-10, atol=1e-10)
    assert counted == {"linear": 12, "feed_forward": 12}


@pytest.mark.parametrize("attention", ["linear", "full"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_decoder_fused_step_equals_the_composed_step(attention, activation, counted, monkeypatch):
    model = decoder(attention, activation)
    xs = torch.randn(5, 4, 15, dtype=torch.float64)
    memory = torch.randn(4, 7, 15, dtype=torch.float64)
    fused = steps(model, xs, memory)
    assert counted == {"linear": 5 * 2 * 2, "feed_forward": 5 * 2}
    composed(monkeypatch)
    assert_close("y", fused, steps(model, xs, memory), rtol=1e-10, atol=1e-10)


def test_autograd_dropout_and_hooks_take_the_composed_step(counted):
    model = encoder("linear", "relu")
    x = torch.randn(4, 15, dtype=torch.float64)
    y, _ = model(x)  # autograd records: composed modules, gradients reach the weights
    y.sum().backward()
    assert model.layers[0].linear1.weight.grad is not None
    model.train()
    with torch.no_grad():
        model(x)  # dropout 0.1 in training mode
    model.eval()
    handle = model.layers[0].attention.register_forward_hook(lambda *args: None)
    with torch.no_grad():
        model(x)  # a hook on the attention layer must fire
    handle.remove()
    assert counted["linear"] == 1 and counted["feed_forward"] == 1  # only the second layer's
    with torch.no_grad():
        model(x)
    assert counted["linear"] == 3


def test_fewer_rows_than_min_rows_take_the_composed_step(counted):
    assert MIN_ROWS > 1
    model = encoder("full", "gelu")
    with torch.no_grad():
        model(torch.randn(MIN_ROWS - 1, 15, dtype=torch.float64))
        assert counted == {"linear": 0, "feed_forward": 0}
        model(torch.randn(MIN_ROWS, 15, dtype=torch.float64))
    assert counted == {"linear": 2, "feed_forward": 2}
