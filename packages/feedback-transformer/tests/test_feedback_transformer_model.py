"""Properties of FeedbackTransformer.forward: chaining memories equals one pass, causality,
the FIFO bound, the memory aggregation, distance-aware position bias, cross attention and
its mask, detaching, pickling and parameter use."""

from __future__ import annotations

import io
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from feedback_transformer import FeedbackMemory, FeedbackTransformer, reference


def assert_close(name, actual, expected, **tolerances):
    """``torch.testing.assert_close`` (float64: rtol 1e-7, atol 1e-7) naming the quantity."""
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{name}: {m}", **tolerances)


VOCAB, DIM, HEADS, DIM_HEAD = 23, 16, 2, 8


def make(seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(num_tokens=VOCAB, dim=DIM, depth=2, seq_len=2, mem_len=8)
    options.update(heads=HEADS, dim_head=DIM_HEAD)
    options.update(kwargs)
    model = FeedbackTransformer(**options).double()
    with torch.no_grad():  # move the zero-initialised layer weights and biases off zero
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tokens(*shape, seed=1):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- chaining and FIFO


@pytest.mark.parametrize(
    ("seq_len", "mem_len", "cross"),
    [(1, 64, False), (2, 64, False), (3, 64, True), (2, 3, False), (1, 5, True)],
)
def test_one_pass_equals_chained_memory(seq_len, mem_len, cross):
    """forward(x1 + x2)[x2 part] == forward(x2, memory=memory after x1) (eval; x1's length a
    multiple of seq_len so that the windows line up). Holds for a short mem_len too: the
    FIFO keeps exactly what the one pass sees."""
    model = make(seq_len=seq_len, mem_len=mem_len, cross_attend=cross)
    x = tokens(2, 13)
    split = 6
    kwargs = {}
    if cross:
        kwargs = dict(context=torch.randn(2, 4, DIM, dtype=torch.float64))
    whole, memory = model(x, return_memory=True, **kwargs)
    out1, mem1 = model(x[:, :split], return_memory=True, **kwargs)
    out2, mem2 = model(x[:, split:], memory=mem1, return_memory=True, **kwargs)
    assert_close("first part", out1, whole[:, :split])
    assert_close("second part", out2, whole[:, split:])
    assert_close("memory keys", mem2.keys, memory.keys)
    assert_close("memory values", mem2.values, memory.values)
    # a plain (keys, values) tuple works as well
    out2b = model(x[:, split:], memory=(mem1.keys, mem1.values), **kwargs)
    assert_close("tuple memory", out2b, out2)


@pytest.mark.parametrize("mem_len", [0, 1, 4, 7])
def test_memory_never_longer_than_mem_len(mem_len):
    model = make(seq_len=2, mem_len=mem_len)
    memory, total = None, 0
    for n in (1, 3, 2, 5):
        _, memory = model(tokens(2, n, seed=n), memory=memory, return_memory=True)
        total += n
        assert isinstance(memory, FeedbackMemory)
        assert memory.keys.shape == (2, HEADS, min(mem_len, total), DIM_HEAD)
        assert memory.values.shape == memory.keys.shape
    keys, values = memory  # unpacks like the peer's Memory(keys, values)
    assert keys is memory.keys and values is memory.values


def test_longer_memory_keeps_its_newest_steps():
    model = make(seq_len=1, mem_len=3)
    _, long_memory = make(seq_len=1, mem_len=10)(tokens(2, 7), return_memory=True)
    newest = (long_memory.keys[:, :, -3:], long_memory.values[:, :, -3:])
    x = tokens(2, 4, seed=5)
    assert_close("trimmed", model(x, memory=long_memory), model(x, memory=newest))


def test_mem_len_zero_means_no_memory():
    """The peer keeps an unbounded memory for mem_len=0; here nothing crosses windows."""
    model = make(seq_len=2, mem_len=0)
    assert model.layer_weight is None  # nothing to mix
    x = tokens(2, 8)
    out, memory = model(x, return_memory=True)
    assert memory.keys.shape == (2, HEADS, 0, DIM_HEAD)
    y = x.clone()
    y[:, :6] = tokens(2, 6, seed=9)  # change every earlier window
    assert_close("last window", model(y)[:, 6:], out[:, 6:])


def test_odd_trailing_token_without_memory():
    """A last window of one token with no memory (the peer crashes) has nothing to attend
    to: its attention output is zero."""
    model = make(seq_len=2, mem_len=0)
    for n in (1, 3, 5):
        out = model(tokens(2, n))
        assert out.shape == (2, n, VOCAB) and torch.isfinite(out).all()
    # the single token equals the first token of any longer input (same empty view)
    x = tokens(2, 3)
    assert_close("single", model(x[:, :1]), model(x)[:, :1])


# ---------------------------------------------------------------- causality


@pytest.mark.parametrize(("seq_len", "cross"), [(1, False), (2, True), (3, False)])
def test_causality(seq_len, cross):
    model = make(seq_len=seq_len, mem_len=4, cross_attend=cross)
    kwargs = dict(context=torch.randn(2, 3, DIM, dtype=torch.float64)) if cross else {}
    x = tokens(2, 10)
    out = model(x, **kwargs)
    for t in range(10):
        y = x.clone()
        y[:, t:] = (y[:, t:] + 1 + torch.arange(10 - t)) % VOCAB
        changed = model(y, **kwargs)
        assert_close(f"positions before {t}", changed[:, :t], out[:, :t])
        assert not torch.allclose(changed[:, t], out[:, t])


# ---------------------------------------------------------------- memory aggregation


def _layer_states(model, x):
    """Embedding and every layer's output ``(b, n, dim)`` of one pass of the paper path
    (``reference.feedback_layer`` recorded window by window)."""
    captured = []

    def record(*args, **kwargs):
        captured.append(layer_forward(*args, **kwargs))
        return captured[-1]

    layer_forward = reference.feedback_layer
    model.use_fast_path = False
    try:
        with mock.patch.object(reference, "feedback_layer", record):
            model(x)
    finally:
        model.use_fast_path = True
    depth = len(model.layers)
    per_layer = [captured[i::depth] for i in range(depth)]  # windows run layer by layer
    return [model.token_emb(x)] + [torch.cat(chunks, dim=1) for chunks in per_layer]


def _kv(model, merged):
    k, v = F.linear(model.attn_norm(merged), model.to_kv.weight).chunk(2, dim=-1)
    shape = (merged.shape[0], merged.shape[1], model.heads, model.dim_head)
    return k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)


@pytest.mark.parametrize("keep_last_hidden", [False, True])
def test_memory_aggregation(keep_last_hidden):
    """A step's memory is the shared key/value projection of the normalised (attention
    pre-norm, like the window keys) softmax(layer_weight)-weighted mix of the embedding and
    every layer output; with keep_last_hidden, of the last layer output only."""
    model = make(seq_len=2, mem_len=16, keep_last_hidden=keep_last_hidden)
    x = tokens(2, 7)
    if keep_last_hidden:
        assert model.layer_weight is None
    else:
        with torch.no_grad():
            model.layer_weight.copy_(torch.tensor([0.3, -1.0, 2.0]))
    states = _layer_states(model, x)
    _, memory = model(x, return_memory=True)
    if keep_last_hidden:
        merged = states[-1]
    else:
        mix = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64).softmax(0)
        merged = sum(w * s for w, s in zip(mix, states))
        # the last layer alone would be different
        assert not torch.allclose(_kv(model, states[-1])[0], memory.keys)
    keys, values = _kv(model, merged)
    assert_close("keys", memory.keys, keys)
    assert_close("values", memory.values, values)


def test_default_mix_is_uniform():
    model = FeedbackTransformer(num_tokens=5, dim=8, depth=3, mem_len=4, heads=1, dim_head=4)
    assert_close("weights", model.layer_weight.softmax(0), torch.full((4,), 0.25))


# ---------------------------------------------------------------- position bias


def test_position_bias_sees_memory_distance():
    """Memory slots get their real distance: the bias bucket of distance 5 matters for a
    seq_len=1 model (the peer puts every memory slot in bucket 0)."""
    model = make(seq_len=1, mem_len=16)
    x = tokens(2, 10)
    out = model(x)
    with torch.no_grad():
        model.rel_pos.relative_attention_bias.weight[5] += 3.0
    changed = model(x)
    assert_close("steps 0..4", changed[:, :5], out[:, :5])  # no key at distance 5 yet
    for t in range(5, 10):  # step t sees step t - 5 (the memory is long enough)
        assert not torch.allclose(changed[:, t], out[:, t])


# ---------------------------------------------------------------- cross attention


def test_context_changes_outputs_and_masked_positions_do_not():
    model = make(seq_len=2, mem_len=8, cross_attend=True)
    x = tokens(2, 6)
    context = torch.randn(2, 5, DIM, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 0]], dtype=torch.bool)
    out = model(x, context=context, context_mask=mask)
    assert out.shape == (2, 6, VOCAB)

    other = context.clone()
    other[0, 1] += 1.0  # a visible position
    assert not torch.allclose(model(x, context=other, context_mask=mask)[0], out[0])

    hidden = context.clone()
    hidden[~mask] = 100.0 * torch.randn(int((~mask).sum()), DIM, dtype=torch.float64)
    assert_close("masked positions", model(x, context=hidden, context_mask=mask), out)
    # the mask equals dropping the positions (row 0: position 2)
    dropped = model(x[:1], context=context[:1, [0, 1, 3, 4]])
    assert_close("dropped", dropped, out[:1])


def test_fully_masked_context_gives_finite_outputs():
    model = make(seq_len=1, mem_len=4, cross_attend=True)
    context = torch.randn(2, 3, DIM, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    assert torch.isfinite(model(tokens(2, 4), context=context, context_mask=mask)).all()


def test_cross_attention_does_not_attend_over_the_window():
    """With cross attention the queries see the context only: a one-position context gives
    the same block output whatever the window holds (softmax over one key is 1)."""
    model = make(seq_len=2, mem_len=4, cross_attend=True)
    cross = model.layers[0].cross
    context = torch.randn(2, 1, DIM, dtype=torch.float64)
    keys, values = cross.project(context)
    a = cross(torch.randn(2, 3, DIM, dtype=torch.float64), keys, values, None)
    b = cross(torch.randn(2, 3, DIM, dtype=torch.float64), keys, values, None)
    assert_close("window-independent", a, b)


# ---------------------------------------------------------------- gradients and memory


def test_returned_memory_is_detached_by_default():
    model = make().train()
    _, memory = model(tokens(2, 5), return_memory=True)
    assert not memory.keys.requires_grad and not memory.values.requires_grad


@pytest.mark.parametrize("seq_len", [1, 2])
def test_memory_keeps_graph_on_request(seq_len):
    """With detach_memory=False, gradients flow through the memory into the first call:
    the gradients of the second call's loss equal those of one pass over both parts."""
    model = make(seq_len=seq_len, mem_len=32)
    x = tokens(2, 8)
    target = torch.randn(2, 4, VOCAB, dtype=torch.float64)
    params = list(model.parameters())
    whole = model(x)[:, 4:]
    expected = torch.autograd.grad((whole * target).sum(), params)
    _, memory = model(x[:, :4], return_memory=True, detach_memory=False)
    assert memory.keys.requires_grad
    got = torch.autograd.grad((model(x[:, 4:], memory=memory) * target).sum(), params)
    for (name, _), g, e in zip(model.named_parameters(), got, expected):
        assert_close(name, g, e)


def test_gradients_accumulate_over_calls_and_retained_graphs():
    """Weight gradients formed once per call (``_step_linear.StepLinear``) accumulate like
    autograd's: two backward passes over a retained graph and a third call give 3x one call's."""
    model = make(seq_len=2, mem_len=4).train()
    x = tokens(2, 7)
    params = list(model.parameters())
    once = torch.autograd.grad(model(x).square().mean(), params)
    loss = model(x).square().mean()
    loss.backward(retain_graph=True)
    loss.backward()
    model(x).square().mean().backward()
    for (name, p), g in zip(model.named_parameters(), once):
        assert_close(name, p.grad, 3 * g)


@pytest.mark.parametrize(
    "options",
    [
        dict(seq_len=1, keep_last_hidden=True),
        dict(seq_len=2, keep_last_hidden=True, cross_attend=True),
        dict(seq_len=1),
        dict(seq_len=3, cross_attend=True),
    ],
    ids=["W1-last", "W2-last-cross", "W1-mix", "W3-mix-cross"],
)
def test_every_parameter_is_used(options):
    """No parameter is left without a gradient (DDP's unused-parameter error)."""
    model = make(mem_len=4, **options).train()
    kwargs = {}
    if options.get("cross_attend"):
        kwargs = dict(context=torch.randn(2, 3, DIM, dtype=torch.float64))
    model(tokens(2, 7), **kwargs).sum().backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert not unused


@pytest.mark.parametrize("seq_len", [1, 2])
def test_torch_save_whole_model(seq_len):
    """torch.save(model) works (the peer's seq_len=1 model does not pickle)."""
    model = make(seq_len=seq_len, mem_len=4)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = tokens(2, 5)
    assert_close("reloaded", loaded(x), model(x))


def test_seed_constructor_defaults():
    model = FeedbackTransformer(num_tokens=10, dim=16, depth=1, mem_len=4)
    assert (model.seq_len, model.heads, model.dim_head) == (2, 8, 64)
    assert not model.keep_last_hidden and not model.cross_attend
    assert model.layers[0].ff.net[0].out_features == 2 * 4 * 16  # GEGLU, mult 4
