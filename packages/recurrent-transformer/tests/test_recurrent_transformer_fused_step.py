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


@pytest.fixture(autouse=True)
def layer_by_layer(monkeypatch):
    """These tests are about the layers' fused step: the encoder's and the decoder's chains of
    all layers (tested in test_recurrent_transformer_step_chain*.py) are turned off."""
    monkeypatch.setattr(transformers, "chained_step", lambda *args: None)
    monkeypatch.setattr(transformers, "chained_decoder_step", lambda *args: None)


@pytest.fixture
def counted(monkeypatch):
    """Counts the fused sublayer calls (of the prepared ops that the fused step keeps)."""
    calls = {"linear": 0, "feed_forward": 0}
    for name, cls in (
        ("linear", fused_step.PreparedResidualLinear),
        ("feed_forward", fused_step.PreparedFeedForward),
    ):
        original = cls.__call__

        def wrapper(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "__call__", wrapper)
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


# the query, key and value projections as one product (stacked weights, cached)


def one_step(model, x, state):
    """The output and new state of one step from ``state`` (left untouched)."""
    with torch.no_grad():
        return model(x, state=state)


def assert_same_step(fused, composed_step):
    (y, state), (y_ref, state_ref) = fused, composed_step
    assert_close("y", y, y_ref, rtol=1e-10, atol=1e-10)
    for i, (a, b) in enumerate(zip(state, state_ref)):
        for name, t, t_ref in zip(("S", "Z"), a.as_sequence(), b.as_sequence()):
            assert_close(f"layer {i} {name}", t, t_ref, rtol=1e-10, atol=1e-10)


def test_stacked_projections_follow_every_change_of_the_weights(monkeypatch):
    model = encoder("linear", "relu")
    x = torch.randn(4, 15, dtype=torch.float64)
    _, state = one_step(model, x, None)
    attention = model.layers[0].attention
    changes = [
        lambda: attention.key_projection.weight.add_(0.5),  # in place (_version)
        lambda: setattr(attention.value_projection, "weight",
                        torch.nn.Parameter(torch.randn(15, 15, dtype=torch.float64))),
        lambda: setattr(attention.query_projection.bias, "data",
                        torch.randn(12, dtype=torch.float64)),  # a new .data
        lambda: attention.query_projection.weight.data.copy_(  # through .data: no _version
            torch.randn(12, 15, dtype=torch.float64)
        ),
        lambda: attention.key_projection.bias.data.mul_(3),
        lambda: model.load_state_dict({k: v + 0.1 for k, v in model.state_dict().items()}),
    ]  # fmt: skip
    for change in changes:
        with torch.no_grad():
            change()
        fused = one_step(model, x, state)
        with monkeypatch.context() as m:
            composed(m)
            assert_same_step(fused, one_step(model, x, state))
    W, B, _ = attention._stacked_projections["qkv"][2]  # the stacked path ran
    assert attention.value_projection.weight.data_ptr() == W[24:].data_ptr()  # views of it
    assert attention.key_projection.bias.data_ptr() == B[12:].data_ptr()


def test_prepared_sublayers_follow_every_change_of_the_weights_and_options(monkeypatch, counted):
    """The fused step keeps one prepared op per sublayer (its weights checked once); a new
    parameter object, new ``.data``, an in-place update, a loaded state_dict, another epsilon
    or activation: each next step still equals the composed one."""
    model = encoder("linear", "relu")
    x = torch.randn(4, 15, dtype=torch.float64)
    _, state = one_step(model, x, None)
    layer = model.layers[1]
    changes = [
        lambda: layer.linear1.weight.mul_(1.5),  # in place
        lambda: setattr(layer.norm1, "weight",
                        torch.nn.Parameter(torch.rand(15, dtype=torch.float64) + 0.5)),
        lambda: setattr(layer.linear2.bias, "data", torch.randn(15, dtype=torch.float64)),
        lambda: setattr(layer.attention.out_projection.weight, "data",
                        torch.randn(15, 30, dtype=torch.float64)[:, ::2]),  # strided
        lambda: setattr(layer.norm2, "eps", 0.5),
        lambda: setattr(layer.norm1, "eps", 1e-3),
        lambda: setattr(layer, "activation", torch.nn.functional.gelu),
        lambda: model.load_state_dict({k: v * 0.9 for k, v in model.state_dict().items()}),
    ]  # fmt: skip
    for change in changes:
        with torch.no_grad():
            change()
        before = dict(counted)
        fused = one_step(model, x, state)
        assert counted["feed_forward"] == before["feed_forward"] + 2  # the fused step ran
        with monkeypatch.context() as m:
            composed(m)
            assert_same_step(fused, one_step(model, x, state))


def test_the_fused_step_reuses_its_prepared_ops(monkeypatch):
    """One prepared op per sublayer, made at the first step and reused by the next ones (its
    weights checked once), also for modules shared by several layers (tied weights)."""
    made = []
    for cls in (fused_step.PreparedResidualLinear, fused_step.PreparedFeedForward):
        original = cls.__init__

        def counting(self, *args, _original=original, **kwargs):
            made.append(type(self).__name__)
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counting)
    model = encoder("linear", "relu")
    x = torch.randn(4, 15, dtype=torch.float64)
    steps(model, [x] * 5)
    assert sorted(made) == ["PreparedFeedForward"] * 2 + ["PreparedResidualLinear"] * 2
    made.clear()
    model.layers[1].linear1 = model.layers[0].linear1  # tied: one module, two layers
    model.layers[1].attention.out_projection = model.layers[0].attention.out_projection
    fused = steps(model, [x] * 5)
    assert sorted(made) == ["PreparedFeedForward", "PreparedResidualLinear"]  # one new each
    with monkeypatch.context() as m:
        composed(m)
        assert_close("tied", fused, steps(model, [x] * 5), rtol=1e-10, atol=1e-10)


def test_stacked_projections_follow_a_change_of_dtype():
    model = encoder("linear", "gelu")
    x = torch.randn(4, 15, dtype=torch.float64)
    one_step(model, x, None)
    model.float()  # same parameter objects, new data
    y, state = one_step(model, x.float(), None)
    assert y.dtype == torch.float32 and state[0].S.dtype == torch.float32
    stacked = model.layers[0].attention._stacked_projections["qkv"][2]
    assert stacked[0].dtype == torch.float32


def test_projections_that_cannot_be_stacked_take_the_three_products(monkeypatch):
    model = encoder("full", "relu")
    attention = model.layers[1].attention
    attention.key_projection.bias = None  # one projection without bias
    x = torch.randn(4, 15, dtype=torch.float64)
    fused = one_step(model, x, None)
    assert "qkv" not in attention.__dict__.get("_stacked_projections", {})
    composed(monkeypatch)
    assert_same_step(fused, one_step(model, x, None))


@pytest.mark.parametrize(
    "module",
    ["attention.query_projection", "attention.value_projection", "attention.out_projection",
     "linear1", "linear2", "norm1", "norm2", "attention"],
)  # fmt: skip
def test_a_hook_on_any_bypassed_module_fires(module, counted):
    model = encoder("linear", "relu")
    target = model.layers[0].get_submodule(module)
    fired = []
    target.register_forward_hook(lambda *args: fired.append(1))
    with torch.no_grad():
        model(torch.randn(4, 15, dtype=torch.float64))
    assert fired == [1]
    assert counted == {"linear": 1, "feed_forward": 1}  # the second layer stays fused


def test_a_global_hook_takes_the_composed_step(counted):
    model = encoder("linear", "relu")
    fired = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: fired.append(1))
    try:
        with torch.no_grad():
            model(torch.randn(4, 15, dtype=torch.float64))
    finally:
        handle.remove()
    assert fired and counted == {"linear": 0, "feed_forward": 0}


def test_qkv_listeners_get_their_events_from_the_fused_step(counted):
    from attention_core.events import EventDispatcher, QKVEvent

    model = encoder("linear", "relu")
    dispatcher = EventDispatcher.get("")
    events = []
    dispatcher.listen(QKVEvent, events.append)
    try:
        with torch.no_grad():
            model(torch.randn(4, 15, dtype=torch.float64))
    finally:
        dispatcher.remove(events.append)
    assert len(events) == 2 and counted == {"linear": 2, "feed_forward": 2}
    assert events[0].queries.shape == (4, 3, 4)


def test_a_step_under_inference_mode_leaves_the_model_trainable():
    model = encoder("linear", "relu")
    x = torch.randn(4, 15, dtype=torch.float64)
    with torch.inference_mode():
        model(x)
    weight = model.layers[0].attention.query_projection.weight
    assert "qkv" in model.layers[0].attention._stacked_projections  # the fused step ran
    assert not weight.is_inference()
    model.train()
    y, _ = model(x)
    y.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_a_subclass_with_its_own_heads_keeps_them(monkeypatch):
    from recurrent_transformer.attention import RecurrentAttentionLayer

    class ScaledQueries(RecurrentAttentionLayer):
        def heads(self, query, key, value, state=None):
            return super().heads(2 * query, key, value, state)

    model = encoder("linear", "relu")
    for layer in model.layers:
        layer.attention.__class__ = ScaledQueries
    x = torch.randn(4, 15, dtype=torch.float64)
    fused = one_step(model, x, None)
    assert "_stacked_projections" not in model.layers[0].attention.__dict__
    composed(monkeypatch)
    assert_same_step(fused, one_step(model, x, None))


def test_a_compiled_step_does_not_touch_the_table_of_prepared_ops(monkeypatch):
    """torch.compile would guard on the weakly keyed table's contents, which change whenever
    a module is collected (a guard that indexed it failed in CI): under compile the
    sublayers call the functions instead."""

    def refuse(*args, **kwargs):
        raise AssertionError("the table of prepared ops was used under torch.compile")

    model = encoder("linear", "gelu")
    xs = torch.randn(4, 4, 15, dtype=torch.float64)
    eager = steps(model, xs)
    monkeypatch.setattr(fused_step, "_prepared", refuse)
    compiled = torch.compile(lambda x, s: model(x, state=s), backend="eager")
    state, outputs = None, []
    with torch.no_grad():
        for x in xs:
            y, state = compiled(x, state)
            outputs.append(y)
    assert_close("compiled", torch.stack(outputs), eager, rtol=1e-10, atol=1e-10)
