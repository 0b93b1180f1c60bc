"""The encoder's step as one chain call (``recurrent_transformer._step_chain``): equal in
float64 to the layer-by-layer step, taken only where the layers compute what the chain does,
made once and made again when a parameter or an option changes."""

import gc
import weakref

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
    local = RecurrentEncoderBuilder.from_kwargs(
        n_layers=1, n_heads=2, query_dimensions=4, value_dimensions=4, attention_type="local",
        local_context=3,
    ).get().eval()  # fmt: skip
    with torch.no_grad():
        local(torch.randn(3, 8))
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
    chain = weakref.ref(step_chain._CHAINS[model][3])
    del model
    gc.collect()
    assert chain() is None  # the table does not keep a model's chain alive


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class ShiftedNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) + 1


def _subclass(model, case):
    layer = model.layers[1]
    attention = layer.attention
    if case == "linear subclass as out_projection":
        attention.out_projection.__class__ = ScaledLinear
    elif case == "linear subclass as linear1":
        layer.linear1.__class__ = ScaledLinear
    elif case == "layer norm subclass":
        layer.norm1.__class__ = ShiftedNorm
    elif case == "weight norm on linear2":
        torch.nn.utils.parametrizations.weight_norm(layer.linear2)
    elif case == "attention layer with its own forward":
        base = type(attention)
        attention.__class__ = type(
            "Doubled",
            (base,),
            {
                "forward": lambda self, *a, **k: (lambda o: (o[0] * 2, o[1]))(
                    base.forward(self, *a, **k)
                )
            },
        )
    else:  # a layer with its own feed-forward block
        base = type(layer)
        layer.__class__ = type(
            "Halved",
            (base,),
            {"_feed_forward": lambda self, x, norm: base._feed_forward(self, x, norm) / 2},
        )


@pytest.mark.parametrize(
    "case",
    [
        "linear subclass as out_projection", "linear subclass as linear1",
        "layer norm subclass", "weight norm on linear2",
        "attention layer with its own forward", "layer with its own feed-forward",
    ],
)  # fmt: skip
@pytest.mark.parametrize("rows", [1, 4])
def test_subclasses_and_parametrizations_take_the_modules(case, rows, chain_calls, monkeypatch):
    """What a subclass or a parametrization computes from the same parameters is what the
    modules compute, at every row count (the chain and the fused layers skip them)."""
    model = encoder()
    _subclass(model, case)
    xs = torch.randn(3, rows, 8, dtype=torch.float64)
    fast, _ = run(model, xs)
    monkeypatch.setattr(transformers, "chained_step", lambda *args: None)
    monkeypatch.setattr(transformers, "fused_step_enabled", lambda *args: False)
    assert_close("y", fast, run(model, xs)[0], rtol=1e-10, atol=1e-10)
    assert chain_calls["calls"] == 0


def test_parameters_keep_their_storage(monkeypatch):
    """The chain reads the parameters where they are: views of a vector stay views of it."""
    model = encoder()
    vector = torch.nn.utils.parameters_to_vector(model.parameters())
    torch.nn.utils.vector_to_parameters(vector, model.parameters())
    x = torch.randn(2, 1, 8, dtype=torch.float64)
    run(model, x)
    with torch.no_grad():
        vector.mul_(0.5)  # reaches every parameter
    assert_same_run(model, x, monkeypatch)
    assert all(p.untyped_storage().data_ptr() == vector.untyped_storage().data_ptr()
               for p in model.parameters())  # fmt: skip


def test_a_resized_feed_forward_remakes_the_chain(chain_calls, monkeypatch):
    model = encoder()
    xs = torch.randn(2, 3, 8, dtype=torch.float64)
    run(model, xs)
    layer = model.layers[0]
    layer.linear1.weight.data = torch.randn(30, 8, dtype=torch.float64)
    layer.linear1.bias.data = torch.randn(30, dtype=torch.float64)
    layer.linear2.weight.data = torch.randn(8, 30, dtype=torch.float64)
    assert_same_run(model, xs, monkeypatch)
    assert chain_calls["made"] == 2


def test_each_state_is_its_own_tensor():
    model = encoder()
    with torch.no_grad():
        _, state = model(torch.randn(3, 8, dtype=torch.float64))
    storages = {t.untyped_storage().data_ptr() for s in state for t in (s.S, s.Z)}
    assert len(storages) == 2 * len(state)
    weight = torch.ones((), dtype=torch.float64, requires_grad=True)
    state[0].S.add_(weight)  # in place under grad mode, as on a layer's own state
    assert state[0].S.requires_grad
