"""Tests of attention_core.generation: logit filters, sampling and the decoding loops."""

from __future__ import annotations

import math

import pytest
import torch

from attention_core.generation import (
    StepModel,
    filter_by_threshold,
    generate,
    sample,
    stream,
    threshold_top_k,
    top_k_filter,
    top_p_filter,
)
from attention_core.testing import seeded

NEG_INF = float("-inf")


# ---------------------------------------------------------------- filters


def kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row > NEG_INF).flatten().tolist()) for row in logits]


@pytest.mark.parametrize("V,k", [(1, 1), (7, 3), (13, 13), (5, 9), (11, 1)], ids=str)
def test_top_k_filter_keeps_the_k_largest(V, k):
    logits = torch.randn(4, V, generator=seeded(0), dtype=torch.float64)
    out = top_k_filter(logits, k)
    for row, out_row, keep in zip(logits, out, kept(out), strict=True):
        ranked = sorted(range(V), key=lambda t: -float(row[t]))
        assert keep == set(ranked[: min(k, V)])
        assert torch.equal(out_row[list(keep)], row[list(keep)])


def test_top_k_filter_ties_keep_exactly_k():
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    keep = kept(top_k_filter(logits, 2))[0]
    assert len(keep) == 2 and keep <= {1, 2, 3}


def nucleus_reference(row: torch.Tensor, p: float) -> set[int]:
    probs = torch.softmax(row.double(), dim=-1).tolist()
    order = sorted(range(len(probs)), key=lambda t: -probs[t])
    chosen, mass = set(), 0.0
    for t in order:
        chosen.add(t)
        mass += probs[t]
        if mass >= p:
            break
    return chosen


@pytest.mark.parametrize("p", [1e-6, 0.3, 0.5, 0.9, 0.999, 1.0], ids=str)
@pytest.mark.parametrize("V", [1, 2, 17], ids=lambda v: f"V{v}")
def test_top_p_filter_matches_smallest_nucleus(V, p):
    logits = 2 * torch.randn(6, V, generator=seeded(1), dtype=torch.float64)
    out = top_p_filter(logits, p)
    for row, keep in zip(logits, kept(out), strict=True):
        assert keep == nucleus_reference(row, p)
        assert torch.softmax(row, -1)[list(keep)].sum() >= p - 1e-12


def test_top_p_filter_exact_mass_and_minus_inf():
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]], dtype=torch.float64).log()
    assert kept(top_p_filter(logits, 0.75)) == [{0, 1}]  # 0.5 + 0.25 reaches 0.75 exactly
    assert kept(top_p_filter(logits, 0.76)) == [{0, 1, 2}]
    masked = top_k_filter(logits, 2)
    assert kept(top_p_filter(masked, 1.0)) == [{0, 1}]
    assert kept(top_p_filter(masked, 0.99)) == [{0, 1}]


@pytest.mark.parametrize(
    "V,thres,expected", [(10, 0.9, 1), (100, 0.9, 10), (7, 0.5, 4), (5, 1.0, 1), (5, 0.0, 5)]
)
def test_filter_by_threshold_keeps_ceil_fraction(V, thres, expected):
    logits = torch.randn(3, V, generator=seeded(2))
    assert expected == max(1, math.ceil((1 - thres) * V))
    assert threshold_top_k(thres, V) == expected
    out = filter_by_threshold(logits, thres)
    assert kept(out) == kept(top_k_filter(logits, expected))
    assert all(len(keep) == expected for keep in kept(out))


def test_threshold_top_k_checks_its_arguments():
    with pytest.raises(ValueError, match=r"thres must be a float in \[0, 1\]; got 1.5"):
        threshold_top_k(1.5, 10)
    with pytest.raises(ValueError, match="vocab_size must be a positive int; got 0"):
        threshold_top_k(0.5, 0)


def test_filters_bad_arguments():
    logits = torch.randn(2, 5)
    with pytest.raises(ValueError, match="top_k must be a positive int; got 0"):
        top_k_filter(logits, 0)
    with pytest.raises(ValueError, match=r"top_p must be a float in \(0, 1\]; got 0"):
        top_p_filter(logits, 0)
    with pytest.raises(ValueError, match=r"top_p must be a float in \(0, 1\]; got 1.5"):
        top_p_filter(logits, 1.5)
    with pytest.raises(ValueError, match=r"thres must be a float in \[0, 1\]; got -0.1"):
        filter_by_threshold(logits, -0.1)
    with pytest.raises(TypeError, match="logits must be a floating point tensor"):
        top_k_filter(torch.ones(2, 5, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"logits must have shape \(\.\.\., V\) with V >= 1"):
        top_p_filter(torch.ones(2, 0), 0.5)


# ---------------------------------------------------------------- sample


def test_sample_greedy_and_top_k_1_are_argmax():
    logits = torch.randn(9, 6, generator=seeded(3))
    assert torch.equal(sample(logits, temperature=0.0), logits.argmax(-1))
    assert torch.equal(sample(logits, top_k=1, generator=seeded(0)), logits.argmax(-1))
    assert torch.equal(sample(logits, top_p=1e-9, generator=seeded(0)), logits.argmax(-1))
    assert sample(logits, temperature=0).dtype == torch.int64


def test_sample_frequencies_follow_tempered_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5]], dtype=torch.float64)
    temperature, n = 1.7, 20000
    tokens = sample(logits.expand(n, 5), temperature=temperature, generator=seeded(4))
    freq = torch.bincount(tokens, minlength=5).double() / n
    expected = torch.softmax(logits[0] / temperature, dim=-1)
    # binomial standard deviation is < 0.0036 here; 5 sigma
    assert (freq - expected).abs().max() < 0.018
    tokens_k = sample(logits.expand(n, 5), top_k=2, generator=seeded(5))
    assert set(tokens_k.tolist()) == {1, 2}
    share = (tokens_k == 2).double().mean().item()
    assert abs(share - 1 / (1 + math.exp(-1))) < 0.018


def test_sample_is_reproducible_with_generator():
    logits = torch.randn(5, 11, generator=seeded(6))
    a = sample(logits, temperature=0.8, top_p=0.9, generator=seeded(7))
    b = sample(logits, temperature=0.8, top_p=0.9, generator=seeded(7))
    assert torch.equal(a, b) and a.shape == (5,)


def test_sample_tiny_temperature_does_not_overflow():
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    assert sample(logits, temperature=1e-30, generator=seeded(0)).tolist() == [1]


def test_sample_bad_arguments():
    logits = torch.randn(2, 5)
    with pytest.raises(ValueError, match="temperature must be a finite float >= 0; got -1"):
        sample(logits, temperature=-1)
    with pytest.raises(ValueError, match="top_k must be a positive int; got 0"):
        sample(logits, top_k=0)
    with pytest.raises(ValueError, match=r"top_p must be a float in \(0, 1\]; got 0.0"):
        sample(logits, top_p=0.0)
    with pytest.raises(ValueError, match=r"logits must have 2 dimensions; got shape \(5,\)"):
        sample(logits[0])


# ---------------------------------------------------------------- decoding loops


class SecondOrderModel:
    """Toy StepModel whose logits depend on the last two tokens, so that the state (the
    history) must be threaded correctly: ``logits = first[h[-1]] + second[h[-2]]``."""

    def __init__(self, vocab: int, seed: int = 0, sharpness: float = 3.0):
        g = seeded(seed)
        self.first = sharpness * torch.randn(vocab, vocab, generator=g)
        self.second = sharpness * torch.randn(vocab, vocab, generator=g)
        self.prefills = self.steps = 0

    def logits(self, history: torch.Tensor) -> torch.Tensor:
        out = self.first[history[:, -1]]
        if history.shape[1] > 1:
            out = out + self.second[history[:, -2]]
        return out

    def prefill(self, tokens):
        self.prefills += 1
        assert not torch.is_grad_enabled()
        return self.logits(tokens), tokens.clone()

    def step(self, tokens, state):
        self.steps += 1
        assert tokens.shape == (state.shape[0],) and tokens.dtype == torch.int64
        history = torch.cat([state, tokens[:, None]], dim=1)
        return self.logits(history), history


def test_toy_model_satisfies_protocol():
    assert isinstance(SecondOrderModel(3), StepModel)
    assert not isinstance(object(), StepModel)


@pytest.mark.parametrize("B,T,n", [(1, 1, 1), (3, 2, 7), (2, 5, 13)], ids=str)
def test_greedy_equals_argmax_chain(B, T, n):
    model = SecondOrderModel(vocab=11)
    prompt = torch.randint(0, 11, (B, T), generator=seeded(8))
    out = generate(model, prompt, n, temperature=0.0)
    history = prompt.clone()
    for _ in range(n):  # reference: recompute from the full history every time
        nxt = model.logits(history).argmax(-1)
        history = torch.cat([history, nxt[:, None]], dim=1)
    assert torch.equal(out, history)
    assert out.dtype == torch.int64 and out.shape == (B, T + n)
    assert (model.prefills, model.steps) == (1, n - 1)


def test_stream_yields_exactly_max_new_tokens_and_is_reproducible():
    prompt = torch.randint(0, 7, (4, 3), generator=seeded(9))
    kwargs = dict(temperature=1.3, top_k=5, top_p=0.95)
    items = list(stream(SecondOrderModel(7), prompt, 9, generator=seeded(10), **kwargs))
    assert len(items) == 9 and all(t.shape == (4,) and t.dtype == torch.int64 for t in items)
    again = generate(SecondOrderModel(7), prompt, 9, generator=seeded(10), **kwargs)
    assert torch.equal(again[:, 3:], torch.stack(items, dim=1))
    other = generate(SecondOrderModel(7), prompt, 9, generator=seeded(11), **kwargs)
    assert not torch.equal(other, again)


def _replay(model, out, T):
    """Logits the model saw before each generated token of ``out`` ``(B, T + n)``."""
    return [model.logits(out[:, : T + step]) for step in range(out.shape[1] - T)]


def test_top_k_only_emits_top_k_tokens():
    model = SecondOrderModel(vocab=20, sharpness=0.5)  # flat: without top-k others would appear
    prompt = torch.randint(0, 20, (8, 2), generator=seeded(12))
    out = generate(model, prompt, 25, top_k=3, generator=seeded(13))
    for step, logits in enumerate(_replay(model, out, 2)):
        top3 = logits.topk(3, dim=-1).indices
        assert (top3 == out[:, 2 + step, None]).any(-1).all()


def test_top_p_only_emits_nucleus_tokens():
    model = SecondOrderModel(vocab=15, sharpness=1.0)
    prompt = torch.randint(0, 15, (8, 1), generator=seeded(14))
    out = generate(model, prompt, 25, top_p=0.6, temperature=0.7, generator=seeded(15))
    outside = 0
    for step, logits in enumerate(_replay(model, out, 1)):
        for row in range(8):
            nucleus = nucleus_reference(logits[row] / 0.7, 0.6)
            assert int(out[row, 1 + step]) in nucleus
            outside += 15 - len(nucleus)
    assert outside > 0  # the filter did exclude tokens


class CycleModel:
    """Bigram model that deterministically maps token ``i`` to ``i + 1 (mod V)``."""

    def __init__(self, vocab: int = 5):
        self.table = 10 * torch.eye(vocab).roll(1, dims=1)
        self.steps = 0

    def prefill(self, tokens):
        return self.table[tokens[:, -1]], None

    def step(self, tokens, state):
        self.steps += 1
        return self.table[tokens], state


def test_eos_stops_when_every_row_is_done_and_pads_with_eos():
    model = CycleModel(5)
    prompt = torch.tensor([[4, 0], [1, 2], [3, 3]])  # eos=3 already in the prompt of row 2
    out = generate(model, prompt, 10, temperature=0, eos_token=3)
    # rows reach eos after 3, 1 and 5 new tokens: stop after 5
    assert out.tolist() == [
        [4, 0, 1, 2, 3, 3, 3],
        [1, 2, 3, 3, 3, 3, 3],
        [3, 3, 4, 0, 1, 2, 3],
    ]
    assert model.steps == 4
    never = generate(CycleModel(5), prompt, 4, temperature=0, eos_token=7)
    assert never.shape == (3, 6)


def test_zero_new_tokens_returns_prompt_without_running_model():
    model = SecondOrderModel(4)
    prompt = torch.tensor([[1, 2, 3]])
    out = generate(model, prompt, 0)
    assert torch.equal(out, prompt) and out.data_ptr() != prompt.data_ptr()
    assert list(stream(model, prompt, 0)) == [] and model.prefills == 0


def test_stream_does_not_leak_no_grad_to_the_caller():
    it = stream(SecondOrderModel(4), torch.tensor([[1]]), 3)
    assert torch.is_grad_enabled()
    next(it)
    assert torch.is_grad_enabled()
    x = torch.ones(1, requires_grad=True)
    assert (x * 2).requires_grad
    next(it)


def test_stream_validates_eagerly():
    model = SecondOrderModel(4)
    prompt = torch.tensor([[1, 2]])
    cases = [
        (dict(prompt=prompt[0]), ValueError, r"prompt must have 2 dimensions; got shape \(2,\)"),
        (
            dict(prompt=prompt.int()),
            TypeError,
            "prompt must have dtype torch.int64; got torch.int32",
        ),
        (dict(prompt=prompt[:, :0]), ValueError, r"prompt must have shape \(B, T\) with T >= 1"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be a non-negative int; got -1"),
        (dict(temperature=-0.5), ValueError, "temperature must be a finite float >= 0; got -0.5"),
        (dict(top_k=0), ValueError, "top_k must be a positive int; got 0"),
        (dict(top_p=2.0), ValueError, r"top_p must be a float in \(0, 1\]; got 2.0"),
        (dict(eos_token=1.0), TypeError, "eos_token must be an int or None; got float"),
        (dict(model=object()), TypeError, "model must implement the StepModel protocol"),
    ]
    for overrides, error, message in cases:
        kwargs = dict(model=model, prompt=prompt, max_new_tokens=3) | overrides
        with pytest.raises(error, match=message):
            stream(**kwargs)  # raised at call time, before iteration
        with pytest.raises(error, match=message):
            generate(**kwargs)
    assert model.prefills == 0


class BadModel:
    def prefill(self, tokens):
        return torch.zeros(tokens.shape[0] + 1, 4), None

    def step(self, tokens, state):
        return torch.zeros(1, 4), None


def test_bad_model_outputs_are_reported():
    with pytest.raises(ValueError, match=r"model.prefill must return floating logits of shape"):
        generate(BadModel(), torch.tensor([[1]]), 2)

    class NoTuple(BadModel):
        def prefill(self, tokens):
            return torch.zeros(1, 4)

    with pytest.raises(TypeError, match=r"model.prefill must return a \(logits, state\) tuple"):
        generate(NoTuple(), torch.tensor([[1]]), 2)
