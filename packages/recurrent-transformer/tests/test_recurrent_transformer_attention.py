"""Each recurrent attention, stepped one element at a time and prefilled in one pass, against an
independent float64 reference of its formula (dense causal matrices written here), plus the
registries, gradients and input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import recurrent_transformer.builders  # noqa: F401  (registers the recurrent attentions)
from attention_core.attention_registry import (
    AttentionRegistry,
    RecurrentAttentionRegistry,
    RecurrentCrossAttentionRegistry,
)
from attention_core.builders import RecurrentAttentionBuilder, RecurrentCrossAttentionBuilder
from attention_core.events import AttentionEvent, EventDispatcher
from attention_core.masking import LengthMask
from attention_core.testing import assert_close, seeded
from recurrent_transformer.attention import (
    RecurrentAFTFullAttention,
    RecurrentAFTSimpleAttention,
    RecurrentConditionalFullAttention,
    RecurrentCrossFullAttention,
    RecurrentCrossLinearAttention,
    RecurrentExactTopKAttention,
    RecurrentFullAttention,
    RecurrentLinearAttention,
    RecurrentLocalAttention,
)
from recurrent_transformer.state import KVCache, LinearState

SHAPES = [
    pytest.param((1, 1, 1, 1, 1), id="N1-L1-H1-E1-D1"),
    pytest.param((2, 7, 3, 5, 4), id="N2-L7-H3-E5-D4"),
    pytest.param((3, 13, 2, 8, 8), id="N3-L13-H2-E8-D8"),
]
SQUARE = [
    pytest.param((1, 1, 1, 1), id="N1-L1-H1-D1"),
    pytest.param((2, 11, 3, 5), id="N2-L11-H3-D5"),
]


# references (float64, dense causal matrices)


def phi(x):
    return F.elu(x) + 1


def causal(L, S=None):
    S = L if S is None else S
    return torch.ones(L, S, dtype=torch.bool).tril()


def ref_linear(Q, K, V, eps=1e-6):
    A = torch.einsum("nlhe,nshe->nhls", phi(Q), phi(K)) * causal(Q.shape[1])
    out = torch.einsum("nhls,nshd->nlhd", A, V)
    return out / (A.sum(-1).transpose(1, 2)[..., None] + eps)


def ref_softmax(Q, K, V, allowed, temp=None):
    temp = temp or Q.shape[-1] ** -0.5
    scores = torch.einsum("nlhe,nshe->nhls", Q, K) * temp
    scores = scores.masked_fill(~allowed, float("-inf"))
    A = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("nhls,nshd->nlhd", A, V)


def ref_local(Q, K, V, local_context):
    L = Q.shape[1]
    i, j = torch.arange(L)[:, None], torch.arange(L)[None]
    band = (j >= i - local_context // 2) & (j <= i)
    return ref_softmax(Q, K, V, band[None, None])


def ref_topk(Q, K, V, topk):
    N, L, H, _ = Q.shape
    scores = torch.einsum("nlhe,nshe->nhls", Q, K)
    allowed = torch.zeros(N, H, L, L, dtype=torch.bool)
    for n in range(N):
        for h in range(H):
            for t in range(L):
                best = scores[n, h, t, : t + 1].argsort(descending=True)[:topk]
                allowed[n, h, t, best] = True
    return ref_softmax(Q, K, V, allowed)


def ref_aft(Q, K, V, w):
    """``sigmoid(Q_t) * sum_{s<=t} exp(K_s + w_ts) V_s / sum_{s<=t} exp(K_s + w_ts)``."""
    L = Q.shape[1]
    out = torch.zeros_like(V)
    for t in range(L):
        weights = torch.exp(K[:, : t + 1] + w[t, : t + 1, None, None])
        mixed = (weights * V[:, : t + 1]).sum(1) / weights.sum(1)
        out[:, t] = torch.sigmoid(Q[:, t]) * mixed
    return out


# helpers


def random_qkv(N, L, H, E, D, seed=0):
    g = seeded(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return make(N, L, H, E), make(N, L, H, E), make(N, L, H, D)


def step_through(attention, Q, K, V, state=None):
    outputs = []
    for t in range(Q.shape[1]):
        out, state = attention(Q[:, t], K[:, t], V[:, t], state)
        outputs.append(out)
    return torch.stack(outputs, dim=1), state


def self_attentions():
    return {
        "linear": (lambda: RecurrentLinearAttention(8), lambda Q, K, V: ref_linear(Q, K, V)),
        "full": (
            lambda: RecurrentFullAttention(attention_dropout=0.0),
            lambda Q, K, V: ref_softmax(Q, K, V, causal(Q.shape[1])),
        ),
        "local-5": (
            lambda: RecurrentLocalAttention(5, attention_dropout=0.0),
            lambda Q, K, V: ref_local(Q, K, V, 5),
        ),
        "local-1": (
            lambda: RecurrentLocalAttention(1, attention_dropout=0.0),
            lambda Q, K, V: ref_local(Q, K, V, 1),
        ),
        "exact-topk-3": (
            lambda: RecurrentExactTopKAttention(3, attention_dropout=0.0),
            lambda Q, K, V: ref_topk(Q, K, V, 3),
        ),
    }


# self attentions against their references


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(self_attentions()))
def test_self_attention_steps_and_prefill_match_reference(name, shape):
    make, reference = self_attentions()[name]
    Q, K, V = random_qkv(*shape)
    expected = reference(Q, K, V)
    stepped, _ = step_through(make(), Q, K, V)
    assert_close(f"{name} stepped", stepped, expected, rtol=1e-9, atol=1e-9)
    prefilled, _ = make().prefill(Q, K, V)
    assert_close(f"{name} prefill", prefilled, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", SQUARE)
def test_aft_simple_matches_reference(shape):
    N, L, H, D = shape
    Q, K, V = random_qkv(N, L, H, D, D)
    K = K * 30  # large keys: the running maximum must keep exp() finite
    stepped, state = step_through(RecurrentAFTSimpleAttention(), Q, K, V)
    w = torch.zeros(L, L, dtype=torch.float64)
    assert_close("aft-simple", stepped, ref_aft(Q, K, V, w))
    assert state.maximum.shape == (N, H, D)


@pytest.mark.parametrize("shape", SQUARE)
def test_aft_full_matches_reference(shape):
    N, L, H, D = shape
    Q, K, V = random_qkv(N, L, H, D, D, seed=1)
    attention = RecurrentAFTFullAttention(max_sequence_length=16, aft_parameterization=3).double()
    with torch.no_grad():
        attention.u.normal_()
        attention.v.normal_()
    w = attention.u @ attention.v.T
    stepped, cache = step_through(attention, Q, K, V)
    assert_close("aft-full", stepped, ref_aft(Q, K, V, w))
    assert cache.length == L


def test_aft_full_refuses_steps_beyond_max_sequence_length():
    attention = RecurrentAFTFullAttention(max_sequence_length=2, aft_parameterization=2)
    Q, K, V = random_qkv(1, 3, 1, 4, 4)
    with pytest.raises(ValueError, match="max_sequence_length=2"):
        step_through(attention, Q, K, V)


def test_conditional_full_switches_after_length_limit():
    Q, K, V = random_qkv(2, 9, 2, 4, 4)
    attention = RecurrentConditionalFullAttention(
        RecurrentLinearAttention(4), length_limit=5, attention_dropout=0.0
    )
    stepped, state = step_through(attention, Q, K, V)
    full = ref_softmax(Q, K, V, causal(9))
    linear = ref_linear(Q, K, V)
    assert_close("first length_limit steps: softmax", stepped[:, :5], full[:, :5])
    assert_close("later steps: linear", stepped[:, 5:], linear[:, 5:])
    assert state.full is None and isinstance(state.other, LinearState) and state.length == 9


def test_linear_state_is_the_sum_of_outer_products():
    Q, K, V = random_qkv(2, 6, 3, 4, 5)
    _, state = step_through(RecurrentLinearAttention(4), Q, K, V)
    assert_close("S", state.S, torch.einsum("nlhe,nlhm->nhem", phi(K), V))
    assert_close("Z", state.Z, phi(K).sum(1))
    _, prefilled = RecurrentLinearAttention(4).prefill(Q, K, V)
    assert_close("prefill S", prefilled.S, state.S)


@pytest.mark.parametrize("name", ["linear", "full"])
def test_prefill_continues_from_a_state(name):
    make, reference = self_attentions()[name]
    Q, K, V = random_qkv(2, 10, 2, 4, 3)
    attention = make()
    first, state = attention.prefill(Q[:, :4], K[:, :4], V[:, :4])
    second, state = attention.prefill(Q[:, 4:7], K[:, 4:7], V[:, 4:7], state)
    third, _ = step_through(attention, Q[:, 7:], K[:, 7:], V[:, 7:], state)
    assert_close("chunks", torch.cat([first, second, third], 1), reference(Q, K, V))


def test_full_prefill_longer_than_one_chunk(monkeypatch):
    from recurrent_transformer.attention.self_attention import full_attention

    monkeypatch.setattr(full_attention, "_PREFILL_CHUNK", 4)
    Q, K, V = random_qkv(2, 11, 2, 3, 3)
    out, cache = RecurrentFullAttention(attention_dropout=0.0).prefill(Q, K, V)
    assert_close("chunked prefill", out, ref_softmax(Q, K, V, causal(11)))
    assert cache.length == 11


# cross attentions


def cross_inputs(N=3, L=4, S=7, H=2, E=5, D=3, lengths=(7, 3, 1)):
    g = seeded(3)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return make(N, L, H, E), make(N, S, H, E), make(N, S, H, D), torch.tensor(lengths)


def ref_cross_linear(Q, K, V, lengths, eps=1e-6):
    valid = (torch.arange(K.shape[1])[None] < lengths[:, None]).double()
    A = torch.einsum("nlhe,nshe->nhls", phi(Q), phi(K)) * valid[:, None, None]
    return torch.einsum("nhls,nshd->nlhd", A, V) / (A.sum(-1).transpose(1, 2)[..., None] + eps)


@pytest.mark.parametrize(
    "lengths", [(7, 3, 1), (7, 7, 7), (7, 0, 2)], ids=["padded", "full", "empty"]
)
@pytest.mark.parametrize("name", ["linear", "full"])
def test_cross_attention_matches_reference(name, lengths):
    Q, K, V, lengths = cross_inputs(lengths=lengths)
    key_lengths = LengthMask(lengths, max_len=K.shape[1])
    if name == "linear":
        attention = RecurrentCrossLinearAttention(5)
        expected = ref_cross_linear(Q, K, V, lengths)
    else:
        attention = RecurrentCrossFullAttention(attention_dropout=0.0)
        valid = torch.arange(K.shape[1])[None] < lengths[:, None]
        expected = ref_softmax(Q, K, V, valid[:, None, None])
    state, outputs = None, []
    for t in range(Q.shape[1]):
        keys, values = (K, V) if state is None else (None, None)
        out, state = attention(Q[:, t], keys, values, key_lengths, state)
        outputs.append(out)
    assert_close(f"cross {name}", torch.stack(outputs, 1), expected)
    prefilled, _ = attention.prefill(Q, K, V, key_lengths)
    assert_close(f"cross {name} prefill", prefilled, expected)


# gradients


@pytest.mark.parametrize("name", ["linear", "full"])
def test_gradcheck_of_steps(name):
    make, _ = self_attentions()[name]
    Q, K, V = (t.requires_grad_() for t in random_qkv(1, 3, 2, 3, 2))
    attention = make()

    def run(Q, K, V):
        return step_through(attention, Q, K, V)[0]

    assert torch.autograd.gradcheck(run, (Q, K, V))
    assert torch.autograd.gradcheck(lambda Q, K, V: attention.prefill(Q, K, V)[0], (Q, K, V))


def test_gradients_through_the_cache_match_the_reference():
    Q, K, V = (t.requires_grad_() for t in random_qkv(2, 5, 2, 3, 4))
    stepped, _ = step_through(RecurrentFullAttention(attention_dropout=0.0), Q, K, V)
    grads = torch.autograd.grad(stepped.square().sum(), (Q, K, V))
    expected = torch.autograd.grad(ref_softmax(Q, K, V, causal(5)).square().sum(), (Q, K, V))
    for name, g, e in zip("QKV", grads, expected):
        assert_close(f"d{name}", g, e)


# registries and builders


RECURRENT = ["aft-full", "aft-simple", "causal-linear", "conditional-full", "exact-topk", "full",
             "linear", "local"]  # fmt: skip


def test_registries_list_every_recurrent_form():
    assert RecurrentAttentionRegistry.keys == RECURRENT
    assert RecurrentCrossAttentionRegistry.keys == [
        "aft-full",
        "aft-simple",
        "exact-topk",
        "full",
        "linear",
        "local",
    ]


@pytest.mark.parametrize("name", RECURRENT)
def test_parameters_and_specs_match_the_batch_attention(name):
    batch = "causal-linear" if name == "linear" else name
    assert RecurrentAttentionRegistry[name][1] == AttentionRegistry[batch][1]
    for parameter in RecurrentAttentionRegistry[name][1]:
        assert repr(RecurrentAttentionRegistry.spec(parameter)) == repr(
            AttentionRegistry.spec(parameter)
        )


@pytest.mark.parametrize("name", ["aft-full", "conditional-full", "exact-topk", "full", "local"])
def test_a_batch_state_dict_loads_into_the_recurrent_attention(name):
    """Same constructor, same parameters: the batch attention's weights drive the recurrent one."""
    kwargs = dict(query_dimensions=4, local_context=3, max_sequence_length=8, attention_dropout=0.0)
    if name == "conditional-full":
        kwargs["attention"] = AttentionRegistry["aft-full"][0](max_sequence_length=8)
        recurrent_kwargs = dict(kwargs, attention=RecurrentAttentionRegistry["aft-full"][0](8))
    else:
        recurrent_kwargs = kwargs
    batch_class, names = AttentionRegistry[name]
    recurrent_class = RecurrentAttentionRegistry[name][0]
    batch = batch_class(**{k: v for k, v in kwargs.items() if k in names or k == "attention"})
    recurrent = recurrent_class(
        **{k: v for k, v in recurrent_kwargs.items() if k in names or k == "attention"}
    )
    assert recurrent.state_dict().keys() == batch.state_dict().keys()
    recurrent.load_state_dict(batch.state_dict())
    for key, value in batch.state_dict().items():
        assert torch.equal(recurrent.state_dict()[key], value)
    if name == "conditional-full":  # the full attention inside is the recurrent form
        assert isinstance(recurrent.full_attention, RecurrentAttentionRegistry["full"][0])


def test_registry_parameter_tuples():
    assert AttentionRegistry.parameter_tuples("local")[0][0] == "local_context"
    assert [p for p, _ in AttentionRegistry.parameter_tuples("full")] == AttentionRegistry["full"][
        1
    ]
    with pytest.raises(KeyError, match="'nope' is not a registered attention type"):
        AttentionRegistry.parameter_tuples("nope")


def test_builders_construct_recurrent_attentions():
    builder = RecurrentAttentionBuilder.from_kwargs(query_dimensions=8, length_limit=3)
    assert isinstance(builder.get("causal-linear"), RecurrentLinearAttention)
    composite = builder.get("conditional-full:linear")
    assert isinstance(composite, RecurrentConditionalFullAttention)
    assert isinstance(composite.other_attention, RecurrentLinearAttention)
    assert composite.length_limit == 3
    cross = RecurrentCrossAttentionBuilder.from_kwargs(query_dimensions=8)
    assert isinstance(cross.get("linear"), RecurrentCrossLinearAttention)
    with pytest.raises(ValueError, match="unknown recurrent attention type 'reformer'"):
        builder.get("reformer")


def test_full_attention_dispatches_attention_events():
    dispatcher = EventDispatcher()
    seen = []
    dispatcher.listen(AttentionEvent, seen.append)
    attention = RecurrentFullAttention(attention_dropout=0.0, event_dispatcher=dispatcher)
    Q, K, V = random_qkv(2, 3, 2, 4, 4)
    out, _ = step_through(attention, Q, K, V)
    assert [e.attention_matrix.shape for e in seen] == [(2, 2, 1, t) for t in (1, 2, 3)]
    assert_close("with listeners", out, ref_softmax(Q, K, V, causal(3)))


# errors


def test_step_input_errors():
    attention = RecurrentLinearAttention(4)
    q = torch.rand(2, 3, 4)
    with pytest.raises(ValueError, match=r"query must have 3 dimensions; got shape \(2, 5, 3, 4\)"):
        attention(torch.rand(2, 5, 3, 4), q, q)
    with pytest.raises(ValueError, match=r"key must have the shape of query"):
        attention(q, torch.rand(2, 3, 5), q)
    with pytest.raises(TypeError, match=r"key must have dtype torch\.float32; got torch\.float64"):
        attention(q, q.double(), q)
    with pytest.raises(ValueError, match="same head dimension; got 4 and 3"):
        RecurrentAFTSimpleAttention()(q, q, torch.rand(2, 3, 3))


def test_state_errors():
    q = torch.rand(2, 3, 4)
    _, state = RecurrentLinearAttention(4)(q, q, q)
    with pytest.raises(ValueError, match=r"state.S must have shape \(5, 3, 4, 4\).*one batch size"):
        RecurrentLinearAttention(4)(
            torch.rand(5, 3, 4), torch.rand(5, 3, 4), torch.rand(5, 3, 4), state
        )
    with pytest.raises(TypeError, match="RecurrentFullAttention needs a KVCache as state"):
        RecurrentFullAttention()(q, q, q, state)
    _, cache = RecurrentFullAttention()(q, q, q)
    assert isinstance(cache, KVCache)
    with pytest.raises(ValueError, match=r"state.key_buffer must have shape \(2, 3, \*, 6\)"):
        RecurrentFullAttention()(torch.rand(2, 3, 6), torch.rand(2, 3, 6), q, cache)
    with pytest.raises(
        TypeError, match=r"state\.S has dtype torch\.float32 but the input has torch\.float64"
    ):
        RecurrentLinearAttention(4)(q.double(), q.double(), q.double(), state)


def test_deprecated_memory_keyword():
    q = torch.rand(2, 3, 4)
    _, state = RecurrentLinearAttention(4)(q, q, q)
    with pytest.warns(DeprecationWarning, match="'memory' is deprecated"):
        RecurrentLinearAttention(4)(q, q, q, memory=state)
