"""States behave as fast-transformers' sequences (len, indexing, unpacking) and every
recurrent attention accepts the plain list or tuple form, with the same results as the state
object."""

from __future__ import annotations

import pytest
import torch

from attention_core.masking import LengthMask
from attention_core.testing import assert_close
from recurrent_transformer.attention import (
    RecurrentCrossFullAttention,
    RecurrentCrossLinearAttention,
    RecurrentFullAttention,
    RecurrentLinearAttention,
)
from recurrent_transformer.builders import RecurrentEncoderBuilder
from recurrent_transformer.state import KVCache, LinearState, MemoryState, TransformerState

N, H, E, M = 3, 2, 5, 7


def step_inputs(dtype=torch.float64):
    return (torch.randn(N, H, E, dtype=dtype), torch.randn(N, H, E, dtype=dtype),
            torch.randn(N, H, M, dtype=dtype))  # fmt: skip


def softmax_reference(q, keys, values):
    scores = torch.einsum("nhe,nhse->nhs", q, keys) / E**0.5
    return torch.einsum("nhs,nhsm->nhm", scores.softmax(-1), values)


def test_kv_cache_is_keys_values_sequence():
    torch.manual_seed(0)
    attention = RecurrentFullAttention().eval()
    q, k, v = step_inputs()
    _, state = attention(q, k, v)
    assert len(state) == 2
    keys, values = state
    assert keys.shape == (N, H, 1, E) and values.shape == (N, H, 1, M)
    assert state[0] is not None and state[-1].shape == (N, H, 1, M)
    assert_close("state[1]", state[1], v.unsqueeze(2))
    _, state = attention(q, k, v, state)
    assert state[0].shape == (N, H, 2, E)


@pytest.mark.parametrize("form", [list, tuple])
def test_full_attention_accepts_a_list_of_past_keys_and_values(form):
    torch.manual_seed(1)
    attention = RecurrentFullAttention().eval()
    past = [
        torch.randn(N, H, 6, E, dtype=torch.float64),
        torch.randn(N, H, 6, M, dtype=torch.float64),
    ]
    q, k, v = step_inputs()
    out, state = attention(q, k, v, form(past))
    assert isinstance(state, KVCache) and state[0].shape == (N, H, 7, E)
    keys = torch.cat([past[0], k.unsqueeze(2)], dim=2)
    values = torch.cat([past[1], v.unsqueeze(2)], dim=2)
    assert_close("out", out, softmax_reference(q, keys, values))
    assert_close("state[0]", state[0], keys)
    assert_close("state[1]", state[1], values)


def test_linear_attention_accepts_s_z_list_like_its_state():
    torch.manual_seed(2)
    attention = RecurrentLinearAttention(E)
    S, Z = torch.rand(N, H, E, M, dtype=torch.float64), torch.rand(N, H, E, dtype=torch.float64)
    q, k, v = step_inputs()
    out_list, state_list = attention(q, k, v, [S, Z])
    out_obj, state_obj = attention(q, k, v, LinearState(S, Z))
    assert_close("out_list", out_list, out_obj)
    S_new, Z_new = state_list
    assert S_new.shape == (N, H, E, M) and Z_new.shape == (N, H, E)
    assert_close("S_new", S_new, state_obj.S)
    assert len(state_list) == 2


def test_cross_attentions_accept_list_states():
    torch.manual_seed(3)
    memory = torch.randn(N, 4, H, E, dtype=torch.float64)
    values = torch.randn(N, 4, H, M, dtype=torch.float64)
    lengths = LengthMask(torch.full((N,), 4, dtype=torch.int64))
    q = torch.randn(N, H, E, dtype=torch.float64)
    for attention in (RecurrentCrossFullAttention().eval(), RecurrentCrossLinearAttention(E)):
        out, state = attention(q, memory, values, lengths)
        again, _ = attention(q, None, None, None, state=list(state))
        assert_close("again", again, out)
    keys, vals = MemoryState(memory.transpose(1, 2), values.transpose(1, 2))
    assert keys.shape == (N, H, 4, E) and vals.shape == (N, H, 4, M)


def test_encoder_state_is_a_list_of_per_layer_sequences_and_accepted_back():
    torch.manual_seed(4)
    model = RecurrentEncoderBuilder.from_kwargs(
        attention_type="full", n_layers=3, n_heads=2, query_dimensions=4, value_dimensions=4,
        feed_forward_dimensions=8,
    ).get().eval()  # fmt: skip
    state = None
    xs = torch.randn(4, 2, 8)
    with torch.no_grad():
        for x in xs[:3]:
            _, state = model(x, state=state)
        assert isinstance(state, TransformerState) and len(state) == 3
        for layer_state in state:
            assert len(layer_state) == 2
            assert layer_state[0].shape == (2, 2, 3, 4)
        plain = [[t.clone() for t in layer_state] for layer_state in state]
        expected, _ = model(xs[3], state=state)
        got, new_state = model(xs[3], state=plain)
    assert_close("got", got, expected)
    assert new_state[0][0].shape == (2, 2, 4, 4)


def test_bad_sequence_states_name_the_argument():
    attention = RecurrentFullAttention().eval()
    q, k, v = step_inputs()
    with pytest.raises(ValueError, match="state"):
        attention(q, k, v, [torch.zeros(N, H, 2, E, dtype=torch.float64)])
    with pytest.raises(ValueError, match="same \\(N, H, t\\)"):
        attention(q, k, v, [torch.zeros(N, H, 2, E), torch.zeros(N, H, 3, M)])
    with pytest.raises(ValueError, match="S, Z"):
        RecurrentLinearAttention(E)(q, k, v, [torch.zeros(N, H, E, M)])
