"""The encoder's step as one chain call (``recurrent_transformer._step_chain``): equal in
float64 to the layer-by-layer step, taken only where the layers compute what the chain does,
made once and made again when a parameter or an option changes."""

import pytest
import torch
from torch import nn

import recurrent_transformer._step_chain as step_chain
import recurrent_transformer.transformers as transformers
from attention_core.events import EventDispatcher, IntermediateOutput, QKVEvent
from attention_core.feature_maps import ActivationFunctionFeatureMap
from attention_core.step_chain import StepChain
from attention_core.testing import assert_close
from recurrent_transformer.builders import RecurrentEncoderBuilder
from recurrent_transformer.state import LinearState


def encoder(activation="relu", value_dimensions=4, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = RecurrentEncoderBuilder.from_kwargs(
        n_layers=3, n_heads=2, query_dimensions=4, value_dimensions=value_dimensions,
        feed_forward_dimensions=20, attention_type="linear", activation=activation, **kwargs,
    ).get()  # fmt: skip
    with torch.no_grad():  # parameters far from their initialisation
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.double().eval()


def run(model, xs, state=None):
    outputs = []
    with torch.no_grad():
        for x in xs:
            y, state = model(x, state=state)
            outputs.append(y)
    return torch.stack(outputs), state


@pytest.fixture
def chain_calls(monkeypatch):
    """Counts the chain's calls and the chains made."""
    counts = {"calls": 0, "made": 0}
    call, init = StepChain.__call__, StepChain.__init__

    def counting_call(self, *args, **kwargs):
        counts["calls"] += 1
        return call(self, *args, **kwargs)

    def counting_init(self, *args, **kwargs):
        counts["made"] += 1
        init(self, *args, **kwargs)

    monkeypatch.setattr(StepChain, "__call__", counting_call)
    monkeypatch.setattr(StepChain, "__init__", counting_init)
    return counts


def layer_by_layer(monkeypatch):
    monkeypatch.setattr(transformers, "chained_step", lambda *args: None)


def assert_same_run(model, xs, monkeypatch, state=None):
    chained, chained_state = run(model, xs, state)
    with monkeypatch.context() as m:
        layer_by_layer(m)
        layers, layers_state = run(model, xs, state)
    assert_close("y", chained, layers, rtol=1e-10, atol=1e-10)
    for a, b in zip(chained_state, layers_state):
        assert_close("S", a.S, b.S, rtol=1e-10, atol=1e-10)
        assert_close("Z", a.Z, b.Z, rtol=1e-10, atol=1e-10)
    return chained_state


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("value_dimensions", [4, 6])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_the_chain_equals_the_layers(activation, value_dimensions, rows, chain_calls, monkeypatch):
    model = encoder(activation, value_dimensions)
    xs = torch.randn(6, rows, 2 * value_dimensions, dtype=torch.float64)  # d_model = H M
    state = assert_same_run(model, xs, monkeypatch)
    assert chain_calls == {"calls": 6, "made": 1}
    assert all(type(s) is LinearState for s in state)
    # the chain's states continue on the layers' path and the other way round
    assert_same_run(model, xs[:2], monkeypatch, state=state)


def test_float32_and_a_model_without_final_norm(chain_calls, monkeypatch):
    model = encoder().float()
    model.norm = None
    xs = torch.randn(4, 3, 8)
    chained, _ = run(model, xs)
    layer_by_layer(monkeypatch)
    assert_close("y", chained, run(model, xs)[0], rtol=1e-5, atol=1e-5)
    assert chain_calls["calls"] == 4


def hook_targets(model):
    layer = model.layers[1]
    attention = layer.attention
    return {
        "layer": layer,
        "attention": attention,
        "query": attention.query_projection,
        "out": attention.out_projection,
        "inner": attention.inner_attention,
        "feature map": attention.inner_attention.feature_map,
        "linear1": layer.linear1,
        "norm2": layer.norm2,
    }


@pytest.mark.parametrize(
    "target", ["layer", "attention", "query", "out", "inner", "feature map", "linear1", "norm2"]
)
def test_a_hook_on_any_module_of_a_layer_fires(target, chain_calls):
    model = encoder()
    fired = []
    hook_targets(model)[target].register_forward_hook(lambda *args: fired.append(1))
    run(model, torch.randn(2, 3, 8, dtype=torch.float64))
    assert fired and chain_calls["calls"] == 0


def test_autograd_dropout_listeners_and_other_attentions_take_the_layers(chain_calls):
    x = torch.randn(3, 8, dtype=torch.float64)
    model = encoder()
    model(x)  # grad mode on
    model.train()
    with torch.no_grad():
        model(x)  # dropout
    model.eval()
    events = []
    listened = encoder(event_dispatcher=EventDispatcher())  # not the shared default one
    listened.event_dispatcher.listen(IntermediateOutput, events.append)
    with torch.no_grad():
        listened(x)
    assert len(events) == 3
    listened = encoder(event_dispatcher=EventDispatcher())
    listened.event_dispatcher.listen(QKVEvent, events.append)
    with torch.no_grad():
        listened(x)
    assert len(events) == 6
    relu_map = encoder(feature_map=ActivationFunctionFeatureMap.factory(torch.relu))
    with torch.no_grad():
        relu_map(x)
    full = RecurrentEncoderBuilder.from_kwargs(
        n_layers=1, n_heads=2, query_dimensions=4, value_dimensions=4, attention_type="full"
    ).get().eval()  # fmt: skip
    with torch.no_grad():
        full(torch.randn(3, 8))
    assert chain_calls["calls"] == 0


def test_states_the_chain_does_not_take_get_the_layers_errors(chain_calls):
    model = encoder()
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        _, state = model(x)
        wrong = [LinearState(s.S[:2], s.Z[:2]) for s in state]
        with pytest.raises(ValueError, match="state"):
            model(x, state=wrong)
        with pytest.raises(TypeError, match="state"):
            model(x, state=[LinearState(s.S.float(), s.Z.float()) for s in state])
    assert chain_calls["calls"] == 1


def test_the_chain_follows_every_change_of_the_parameters_and_options(chain_calls, monkeypatch):
    model = encoder()
    xs = torch.randn(2, 3, 8, dtype=torch.float64)
    assert_same_run(model, xs, monkeypatch)
    layer = model.layers[2]
    with torch.no_grad():
        layer.linear2.weight.mul_(1.5)  # in place: the same chain reads the new values
        layer.attention.key_projection.bias.add_(0.5)
    assert_same_run(model, xs, monkeypatch)
    assert chain_calls["made"] == 1
    layer.linear1.weight = nn.Parameter(torch.randn_like(layer.linear1.weight))  # replaced
    assert_same_run(model, xs, monkeypatch)
    assert chain_calls["made"] == 2
    layer.norm1.weight.data = torch.randn_like(layer.norm1.weight)  # other storage
    layer.attention.query_projection.weight.data = torch.randn(8, 8, dtype=torch.float64)
    assert_same_run(model, xs, monkeypatch)
    layer.norm2.eps = 1e-2
    layer.attention.inner_attention.eps = 1e-1
    made = chain_calls["made"]
    assert_same_run(model, xs, monkeypatch)
    assert chain_calls["made"] == made + 1
    layer.activation = torch.nn.functional.gelu
    assert_same_run(model, xs, monkeypatch)


def test_tied_layers_and_a_model_collected_with_its_chain(chain_calls, monkeypatch):
    model = encoder()
    model.layers[2] = model.layers[0]  # one layer twice
    xs = torch.randn(3, 3, 8, dtype=torch.float64)
    assert_same_run(model, xs, monkeypatch)
    assert chain_calls["made"] == 1
    before = len(step_chain._CHAINS)
    del model
    import gc

    gc.collect()
    assert len(step_chain._CHAINS) == before - 1
