"""The fast decoding step (`_decode_step`) equals the general path of `step` and `forward`.

float64 models with parameters drawn far from their initialisation; token-by-token decoding over
several block boundaries; logits, memories and states compared at every step.
"""

from __future__ import annotations

import pytest
import torch

import block_recurrent_transformer._decode_step as decode_module
from attention_core.testing import assert_close
from block_recurrent_transformer import BlockRecurrentTransformer, RecurrentTrainerWrapper

WIDTH = 8
PEER_OPTIONS = dict(kv_heads=1, sliding_window=False, state_attends_previous_block=False)
CONFIGS = {
    "paper": {},
    "peer-options": PEER_OPTIONS,
    "grouped-enhanced": dict(
        kv_heads=2, xl_memories_layers=(2,), recurrent_layers=(2, 3), read_recurrent_layers=(1, 3)
    ),
    "peer-enhanced": dict(PEER_OPTIONS, recurrent_layers=(3,), read_recurrent_layers=(2,)),
    "no-xl-qk-norm": dict(
        sliding_window=False, xl_memories_layers=(1,), all_layers_qk_rmsnorm=True
    ),
    "no-positions-lstm-ffn": dict(position_encoding=None, gate_type="lstm", state_ffn=True),
    "two-states": dict(recurrent_layers=(1, 3), kv_heads=1),
}


def make_model(seed: int = 0, **overrides) -> BlockRecurrentTransformer:
    torch.manual_seed(seed)
    kwargs = dict(
        num_tokens=40,
        dim=32,
        depth=3,
        dim_head=8,
        heads=4,
        max_seq_len=16,
        block_width=WIDTH,
        num_state_vectors=4,
    )
    model = BlockRecurrentTransformer(**{**kwargs, **overrides}).double().eval()
    with torch.no_grad():  # far from the initialisation: gains, gates and norms all matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def decode(model, prompt, tokens, *, fast, xl_memories=None, states=None):
    """Logits after the prompt and after each of ``tokens`` ``(B, n)``, and the final state."""
    model._fast_decode = fast
    logits, state = model.prefill(prompt, xl_memories, states)
    out = [logits]
    for t in range(tokens.shape[1]):
        logits, state = model.step(tokens[:, t], state)
        out.append(logits)
    model._fast_decode = True
    return torch.stack(out, dim=1), state


def count_fast_steps(monkeypatch) -> list[int]:
    calls = [0]
    original = decode_module._layer_step

    def spy(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(decode_module, "_layer_step", spy)
    return calls


def assert_same_stream(fast_state, general_state):
    fast_mems, general_mems = fast_state.xl_memories, general_state.xl_memories
    assert fast_mems.position == general_mems.position
    for i, (a, b) in enumerate(zip(fast_mems, general_mems)):
        assert_close(f"memory {i} keys", a.keys, b.keys)
        assert_close(f"memory {i} values", a.values, b.values)
        assert torch.equal(a.valid, b.valid)
    for i, (a, b) in enumerate(zip(fast_state.states, general_state.states)):
        assert_close(f"state {i}", a, b)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_steps_equal_the_general_path_and_forward(monkeypatch, name, batch):
    model = make_model(**CONFIGS[name])
    seq = torch.randint(0, 40, (batch, 11 + 4 * WIDTH), generator=torch.Generator().manual_seed(1))
    prompt, tokens = seq[:, :11], seq[:, 11:]
    calls = count_fast_steps(monkeypatch)
    fast_logits, fast_state = decode(model, prompt, tokens, fast=True)
    # every step but the two at each block start and end, in each of the 3 layers
    assert calls[0] == 3 * (tokens.shape[1] - 2 * 4)
    general_logits, general_state = decode(model, prompt, tokens, fast=False)
    assert_close("logits, fast vs general step", fast_logits, general_logits)
    assert_same_stream(fast_state, general_state)
    whole = model(seq)[0]
    assert_close("logits, fast step vs forward", fast_logits[:, :-1], whole[:, 10:-1])


def test_fast_steps_continue_given_memories_and_states():
    model = make_model(**PEER_OPTIONS)
    seq = torch.randint(0, 40, (2, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, mems, states = model(seq[:, :13])
    fast = decode(model, seq[:, 13:20], seq[:, 20:], fast=True, xl_memories=mems, states=states)
    general = decode(model, seq[:, 13:20], seq[:, 20:], fast=False, xl_memories=mems, states=states)
    assert_close("logits", fast[0], general[0])
    assert_same_stream(fast[1], general[1])
    assert_close("logits vs forward", fast[0][:, :-1], model(seq)[0][:, 19:-1])


def test_dropped_memories_take_the_general_path_and_stay_equal(monkeypatch):
    model = make_model()
    seq = torch.randint(0, 40, (2, 45), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, mems, states = model(seq[:, :12])
    mems = mems.drop(torch.tensor([True, False]))  # invalid slots in row 0
    calls = count_fast_steps(monkeypatch)
    fast = decode(model, seq[:, 12:14], seq[:, 14:], fast=True, xl_memories=mems, states=states)
    assert calls[0] > 0  # once the dropped slots have left the memories
    general = decode(model, seq[:, 12:14], seq[:, 14:], fast=False, xl_memories=mems, states=states)
    assert_close("logits", fast[0], general[0])
    assert_same_stream(fast[1], general[1])


def test_two_steps_from_the_same_state_do_not_share_their_memories():
    model = make_model()
    _, state = model.prefill(torch.randint(0, 40, (1, 10)))
    _, state = model.step(torch.tensor([1]), state)
    a_logits, a_state = model.step(torch.tensor([2]), state)
    b_logits, b_state = model.step(torch.tensor([3]), state)  # a branch from the same state
    a_next, _ = model.step(torch.tensor([4]), a_state)
    model._fast_decode = False
    assert_close("branch a", model.step(torch.tensor([2]), state)[0], a_logits)
    general_b_logits, general_b = model.step(torch.tensor([3]), state)
    assert_close("branch b", general_b_logits, b_logits)
    assert_same_stream(b_state, general_b)
    general_a = model.step(torch.tensor([2]), state)[1]
    assert_close("branch a, next", model.step(torch.tensor([4]), general_a)[0], a_next)
    assert_same_stream(a_state, general_a)


def test_a_weight_changed_between_steps_is_used_by_the_next_step():
    model = make_model()
    _, state = model.prefill(torch.randint(0, 40, (2, 10)))
    _, state = model.step(torch.tensor([1, 2]), state)
    with torch.no_grad():
        model.layers[1].to_kv.weight.mul_(2.0)  # in place: the fused weights must follow
    fast = model.step(torch.tensor([3, 4]), state)[0]
    model._fast_decode = False
    assert_close("logits", fast, model.step(torch.tensor([3, 4]), state)[0])
    model._fast_decode = True
    with torch.no_grad():  # new data under the same parameter (as `module.to` does)
        model.layers[0].to_q.weight.data = model.layers[0].to_q.weight.data * 0.5
    fast = model.step(torch.tensor([3, 4]), state)[0]
    model._fast_decode = False
    assert_close("logits after new data", fast, model.step(torch.tensor([3, 4]), state)[0])


@pytest.mark.parametrize("name", ["paper", "peer-options"])
def test_greedy_generation_gives_the_same_tokens(name):
    model = make_model(**CONFIGS[name]).float()
    wrapper = RecurrentTrainerWrapper(model)
    prime = torch.randint(0, 40, (2, 13), generator=torch.Generator().manual_seed(4))
    fast = wrapper.generate(prime, 13 + 5 * WIDTH, temperature=0.0)
    model._fast_decode = False
    general = wrapper.generate(prime, 13 + 5 * WIDTH, temperature=0.0)
    assert torch.equal(fast, general)


def test_a_forward_hook_selects_the_general_path(monkeypatch):
    """The fast step calls few of the model's modules: a hook on any of them (or a global one)
    must see its calls, so the general path runs."""
    model = make_model(**PEER_OPTIONS)
    seq = torch.randint(0, 40, (1, 11 + 2 * WIDTH), generator=torch.Generator().manual_seed(6))
    calls = count_fast_steps(monkeypatch)
    seen = []
    handle = model.layers[1].ff.register_forward_hook(lambda module, args, out: seen.append(1))
    hooked = decode(model, seq[:, :11], seq[:, 11:], fast=True)[0]
    handle.remove()
    assert calls[0] == 0
    assert len(seen) == 1 + seq.shape[1] - 11  # the prefill's call and one per step
    assert_close("logits", hooked, decode(model, seq[:, :11], seq[:, 11:], fast=True)[0])
    assert calls[0] > 0  # without the hook the fast path runs again
