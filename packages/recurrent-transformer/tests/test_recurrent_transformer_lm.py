"""RecurrentLM: the recurrent twin's prefill and steps give the batch model's logits, greedy
generation equals re-running the batch model on the growing sequence, weights and states
round-trip, and bad arguments fail clearly."""

from __future__ import annotations

import io

import pytest
import torch

from attention_core.generation import StepModel, generate, stream
from attention_core.testing import assert_close
from recurrent_transformer.lm import (
    POSITIONAL_ENCODINGS,
    LMState,
    RecurrentLM,
    sinusoidal_positions,
)

TYPES = {
    "causal-linear": {},
    "full": {"attention_dropout": 0.0},
    "local": {"local_context": 4, "attention_dropout": 0.0},
}


def lm(attention_type="causal-linear", seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {**TYPES.get(attention_type, {}), **kwargs}
    model = RecurrentLM(
        num_tokens=23,
        n_layers=2,
        n_heads=2,
        query_dimensions=4,
        value_dimensions=5,
        attention_type=attention_type,
        **kwargs,
    )
    if model.token_shift is not None:  # zero at initialisation: draw it, so that it matters
        with torch.no_grad():
            model.token_shift.weight.normal_()
    return model.double().eval()


def tokens(B=2, T=9, seed=0):
    return torch.randint(0, 23, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("positional_encoding", POSITIONAL_ENCODINGS)
@pytest.mark.parametrize("attention_type", list(TYPES))
def test_prefill_and_steps_give_the_batch_logits(attention_type, positional_encoding):
    model = lm(attention_type, positional_encoding=positional_encoding)
    assert isinstance(model, StepModel)
    seq = tokens()
    expected = model(seq)
    with torch.no_grad():
        logits, state = model.prefill(seq[:, :4])
        got = [logits]
        for t in range(4, seq.shape[1]):
            logits, state = model.step(seq[:, t], state)
            got.append(logits)
    assert state.position == seq.shape[1]
    assert_close("logits", torch.stack(got, 1), expected[:, 3:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("attention_type", ["causal-linear", "full"])
def test_greedy_generation_equals_rerunning_the_batch_model(attention_type):
    model = lm(attention_type)
    prompt = tokens(T=3)
    out = generate(model, prompt, 6, temperature=0)
    reference = prompt
    with torch.no_grad():
        for _ in range(6):
            next_token = model(reference)[:, -1].argmax(-1, keepdim=True)
            reference = torch.cat([reference, next_token], 1)
    assert torch.equal(out, reference)
    assert torch.equal(model.generate(prompt, 6, temperature=0), reference)


def test_sampling_is_reproducible_with_a_generator():
    model = lm()
    prompt = tokens(T=2)
    draws = [
        torch.stack(
            list(
                stream(
                    model,
                    prompt,
                    5,
                    top_k=5,
                    top_p=0.9,
                    temperature=0.8,
                    generator=torch.Generator().manual_seed(1),
                )
            ),
            1,
        )
        for _ in range(2)
    ]
    assert torch.equal(draws[0], draws[1]) and draws[0].shape == (2, 5)


def test_state_dict_has_only_the_batch_parameters_and_round_trips():
    model = lm()
    keys = list(model.state_dict())
    assert "encoder.layers.0.attention.query_projection.weight" in keys
    assert not any("twin" in key for key in keys)
    other = lm(seed=1)
    prompt = tokens(T=3)
    with torch.no_grad():
        assert not torch.allclose(other(prompt), model(prompt))
    other.load_state_dict(model.state_dict())
    assert torch.equal(
        generate(other, prompt, 4, temperature=0), generate(model, prompt, 4, temperature=0)
    )
    replaced = lm(seed=2)
    replaced.load_state_dict(model.state_dict(), assign=True)  # new Parameter objects
    with torch.no_grad():
        logits, _ = replaced.prefill(prompt)
    assert_close("re-mirrored twin", logits, model(prompt)[:, -1])


def test_lm_state_saves_and_resumes():
    model = lm("full")
    seq = tokens(T=6)
    with torch.no_grad():
        _, state = model.prefill(seq[:, :4])
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=True)
        assert isinstance(loaded, LMState) and loaded.position == 4
        expected, _ = model.step(seq[:, 4], state)
        got, _ = model.step(seq[:, 4], loaded)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("attention_type", ["causal-linear", "full"])
def test_sampled_tokens_respect_top_k_of_the_batch_logits(attention_type):
    model, prompt = lm(attention_type), tokens(T=3)
    out = generate(
        model, prompt, 8, temperature=1.5, top_k=3, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        logits = model(out[:, :-1])[:, prompt.shape[1] - 1 :]  # the logits each draw used
    allowed = logits.topk(3, dim=-1).indices
    drawn = out[:, prompt.shape[1] :]
    assert (allowed == drawn[..., None]).any(-1).all()
    # top_k=1 is greedy, whatever the temperature
    greedy = generate(model, prompt, 8, temperature=0)
    assert torch.equal(generate(model, prompt, 8, temperature=2.0, top_k=1), greedy)


def test_step_without_prefill_uses_the_current_weights():
    model, seq = lm(), tokens(T=5)
    with torch.no_grad():
        _, state = model.prefill(seq[:, :4])
        expected, _ = model.step(seq[:, 4], state)
        # a fresh model that never ran prefill, given the weights and a saved state
        fresh = lm(seed=3)
        fresh.load_state_dict(model.state_dict())
        got, _ = fresh.step(seq[:, 4], state)
        assert_close("fresh step", got, expected)
        # parameters replaced between two steps are picked up
        replaced = lm(seed=4)
        replaced.step(seq[:, 4], state)
        replaced.load_state_dict(model.state_dict(), assign=True)
        assert_close("after assign", replaced.step(seq[:, 4], state)[0], expected)


def test_sinusoidal_positions():
    enc = sinusoidal_positions(torch.arange(3), 5)
    assert enc.shape == (3, 5)
    assert_close("position 0", enc[0], torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0]))
    assert_close("sin(1)", enc[1, 0], torch.tensor(1.0).sin())


def test_lm_errors():
    with pytest.raises(ValueError, match="use attention_type='causal-linear'"):
        RecurrentLM(10, attention_type="linear")
    with pytest.raises(ValueError, match="'reformer' in 'reformer' has no recurrent form"):
        RecurrentLM(10, attention_type="reformer")
    with pytest.raises(
        ValueError, match=r"positional_encoding must be one of 'token-shift', .*; got 'alibi'"
    ):
        RecurrentLM(10, positional_encoding="alibi")
    with pytest.raises(ValueError, match="num_tokens must be a positive int; got 0"):
        RecurrentLM(0)
    model = lm()
    with pytest.raises(ValueError, match=r"tokens must have 2 dimensions; got shape \(4,\)"):
        model.prefill(torch.arange(4))
    with pytest.raises(TypeError, match="tokens must be an integer tensor"):
        model(torch.rand(1, 4))
    with pytest.raises(TypeError, match="state must be the LMState returned by prefill or step"):
        model.step(torch.arange(2), None)
