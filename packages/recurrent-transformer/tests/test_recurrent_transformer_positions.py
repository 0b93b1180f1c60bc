"""Rotary positions around inner attentions: the recurrent form steps to the batch form's
outputs, softmax attention becomes invariant to a shift of all positions, states round-trip,
and bad inputs fail clearly."""

from __future__ import annotations

import io

import pytest
import torch

from attention_core.attention import CausalLinearAttention, FullAttention
from attention_core.masking import LengthMask, TriangularCausalMask
from attention_core.nn.rotary import RotaryEmbedding, apply_rotary_pos_emb
from attention_core.testing import assert_close
from recurrent_transformer.attention.self_attention import (
    RecurrentFullAttention,
    RecurrentLinearAttention,
)
from recurrent_transformer.positions import (
    RecurrentRotaryAttention,
    RotaryAttention,
    RotaryState,
)

N, T, H, E, D = 2, 7, 3, 8, 5
PAIRS = {
    "full": (lambda: FullAttention(attention_dropout=0.0), lambda: RecurrentFullAttention().eval()),
    "causal-linear": (lambda: CausalLinearAttention(E), lambda: RecurrentLinearAttention(E)),
}


def qkv(seed=0, length=T):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(N, length, H, E, generator=g, dtype=torch.float64),
        torch.randn(N, length, H, E, generator=g, dtype=torch.float64),
        torch.randn(N, length, H, D, generator=g, dtype=torch.float64),
    )


def batch(attention, q, k, v):
    L = q.shape[1]
    lengths = LengthMask(torch.full((N,), L), max_len=L)
    return attention(q, k, v, TriangularCausalMask(L), lengths, lengths)


def reference_full(q, k, v, rotated):
    """Causal softmax attention on queries/keys rotated by hand (plain PyTorch)."""
    freqs = RotaryEmbedding(rotated)(torch.arange(q.shape[1]), dtype=torch.float64)
    q, k = (apply_rotary_pos_emb(freqs, t.transpose(1, 2)) for t in (q, k))  # (N, H, L, E)
    scores = q @ k.transpose(-1, -2) / E**0.5
    causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return (weights @ v.transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("rotated", [E, 4], ids=["all-features", "partial"])
def test_rotary_full_attention_matches_a_hand_written_reference(rotated):
    q, k, v = qkv()
    got = batch(RotaryAttention(FullAttention(attention_dropout=0.0), rotated), q, k, v)
    assert_close("rotary full attention", got, reference_full(q, k, v, rotated))


@pytest.mark.parametrize("kind", list(PAIRS))
def test_stepping_and_prefill_give_the_batch_outputs(kind):
    make_batch, make_recurrent = PAIRS[kind]
    q, k, v = qkv(1)
    expected = batch(RotaryAttention(make_batch(), E), q, k, v)
    recurrent = RecurrentRotaryAttention(make_recurrent(), E)
    out, state = recurrent.prefill(q[:, :3], k[:, :3], v[:, :3])
    outs = [out]
    for t in range(3, T):
        step, state = recurrent(q[:, t], k[:, t], v[:, t], state)
        outs.append(step[:, None])
    assert isinstance(state, RotaryState) and state.position == T
    assert_close(f"{kind} steps", torch.cat(outs, 1), expected)


def test_softmax_attention_sees_only_distances():
    """Shifting every position by the same offset leaves rotary softmax attention unchanged,
    while absolute angles differ (the rotated keys are not the same)."""
    q, k, v = qkv(2)
    recurrent = RecurrentRotaryAttention(RecurrentFullAttention(), E).eval()
    at_zero, _ = recurrent.prefill(q, k, v)
    shifted, state = recurrent.prefill(q, k, v, RotaryState(1000, None))
    assert state.position == 1000 + T
    assert_close("shifted", shifted, at_zero, rtol=1e-9, atol=1e-9)
    linear = RecurrentRotaryAttention(RecurrentLinearAttention(E), E)
    assert not torch.allclose(
        linear.prefill(q, k, v)[0], linear.prefill(q, k, v, RotaryState(1000, None))[0]
    )


def test_state_round_trips_through_torch_save():
    q, k, v = qkv(3)
    recurrent = RecurrentRotaryAttention(RecurrentLinearAttention(E), E)
    _, state = recurrent.prefill(q, k, v)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded.position == state.position
    assert_close("S", loaded.inner.S, state.inner.S)
    assert loaded.detach().position == T and loaded.to(torch.float32).inner.S.dtype == torch.float32


def test_bad_inputs_fail_clearly():
    q, k, v = qkv()
    recurrent = RecurrentRotaryAttention(RecurrentFullAttention(), E)
    with pytest.raises(TypeError, match=r"state must be the RotaryState .*; got tuple"):
        recurrent(q[:, 0], k[:, 0], v[:, 0], (1, None))
    wrapper = RotaryAttention(FullAttention(), E)
    with pytest.raises(ValueError, match=r"same length; got shapes \(2, 7, 3, 8\) and \(2, 4"):
        batch_lengths = LengthMask(torch.full((N,), T), max_len=T)
        wrapper(q, k[:, :4], v[:, :4], TriangularCausalMask(T), batch_lengths, batch_lengths)
    with pytest.raises(ValueError, match="dim must be even; got 3"):
        RotaryAttention(FullAttention(), 3)
