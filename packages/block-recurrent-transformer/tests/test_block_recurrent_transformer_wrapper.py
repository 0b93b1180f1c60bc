"""RecurrentTrainerWrapper: the segment loss against one long call, structured dropout of
memories and states, generation with a key/value cache against generation by recomputation,
the per-token attention work of generation, a task that only recurrence can solve, and bad
inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import block_recurrent_transformer._decode_step as decode_module
import block_recurrent_transformer.layer as layer_module
import block_recurrent_transformer.state as state_module
from attention_core.generation import StepModel, filter_by_threshold, sample
from attention_core.testing import assert_close
from block_recurrent_transformer import BlockRecurrentTransformer, RecurrentTrainerWrapper


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: one intra-op thread keeps them fast on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = dict(num_tokens=40, dim=16, dim_head=8, heads=2, block_width=4, num_state_vectors=3)


def make_model(dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = {**SMALL, "depth": 2, "max_seq_len": 8, **overrides}
    return BlockRecurrentTransformer(**kwargs).to(dtype)


# ---------------------------------------------------------------- training loss


@pytest.mark.parametrize("length", [2, 9, 17, 23])
def test_segment_loss_equals_one_long_call(length):
    model = make_model(xl_memories_layers=(2,), recurrent_layers=(2,), read_recurrent_layers=(1,))
    wrapper = RecurrentTrainerWrapper(model, xl_memories_dropout=0.5, state_dropout=0.5).eval()
    seq = torch.randint(0, 40, (3, length))
    logits = model(seq[:, :-1])[0]
    expected = F.cross_entropy(logits.transpose(1, 2), seq[:, 1:])
    assert_close("loss", wrapper(seq), expected)  # eval mode: no structured dropout


def test_segment_loss_ignores_ignore_index_and_returns_memories_and_states():
    model = make_model()
    wrapper = RecurrentTrainerWrapper(model)
    seq = torch.randint(0, 40, (2, 20))
    loss, mems, states = wrapper(seq, return_memories_and_states=True)
    logits, mems_1, states_1 = model(seq[:, :-1])
    assert mems.position == mems_1.position == 19
    assert_close("states", states[0], states_1[0])
    assert_close("memories", mems[1].keys, mems_1[1].keys)
    token_losses = F.cross_entropy(logits.transpose(1, 2), seq[:, 1:], reduction="none")
    assert_close("loss", loss, token_losses.mean())
    last_ignored = seq.clone()
    last_ignored[:, -1] = model.ignore_index  # the last column is only a label
    assert_close("loss", wrapper(last_ignored), token_losses[:, :-1].mean())
    inner_ignored = seq.clone()
    inner_ignored[:, 5] = model.ignore_index  # also an input: not a token id
    with pytest.raises(ValueError, match=r"token ids in \[0, 40\)"):
        wrapper(inner_ignored)


def test_structured_dropout_forgets_memories_and_states_per_segment():
    model = make_model()
    seq = torch.randint(0, 40, (2, 25))  # segments of 8 labels: 8 + 8 + 8
    always = RecurrentTrainerWrapper(model, xl_memories_dropout=1.0, state_dropout=1.0).train()
    # segments start on block boundaries (max_seq_len = 2 W): a dropped stream is a fresh one
    independent = torch.stack(
        [model(seq[:, s : s + 9], return_loss=True)[0] for s in (0, 8, 16)]
    ).mean()
    assert_close("loss", always(seq), independent)
    full = RecurrentTrainerWrapper(model).train()(seq)
    assert (full - independent).abs() > 1e-6
    # memories only: the states still carry the past, so the loss is neither of the two
    mem_only = RecurrentTrainerWrapper(model, xl_memories_dropout=1.0).train()(seq)
    state_only = RecurrentTrainerWrapper(model, state_dropout=1.0).train()(seq)
    for name, loss in (("memories only", mem_only), ("states only", state_only)):
        assert (loss - independent).abs() > 1e-6, name
        assert (loss - full).abs() > 1e-6, name


def test_structured_dropout_is_per_row():
    model = make_model()
    seq = torch.randint(0, 40, (1, 17)).expand(64, -1)  # 64 copies of one sequence
    wrapper = RecurrentTrainerWrapper(model, state_dropout=0.5).train()
    torch.manual_seed(3)
    _, _, states = wrapper(seq, return_memories_and_states=True)
    _, _, kept = RecurrentTrainerWrapper(model).eval()(seq, return_memories_and_states=True)
    _, _, dropped = RecurrentTrainerWrapper(model, state_dropout=1.0).train()(
        seq, return_memories_and_states=True
    )
    is_kept = (states[0] - kept[0]).abs().amax(dim=(1, 2)) < 1e-9
    is_dropped = (states[0] - dropped[0]).abs().amax(dim=(1, 2)) < 1e-9
    assert bool((is_kept ^ is_dropped).all()), "each row is either kept or reset"
    assert 10 < int(is_dropped.sum()) < 54


# ---------------------------------------------------------------- generation


def recompute_generate(model, prime, length, temperature, filter_thres, generator):
    """Generation by recomputation: the whole sequence so far in one fresh call per token."""
    out = prime
    with torch.no_grad():
        while out.shape[1] < length:
            logits = model(out)[0][:, -1]
            token = sample(
                filter_by_threshold(logits, filter_thres), temperature, generator=generator
            )
            out = torch.cat((out, token[:, None]), dim=1)
    return out[:, prime.shape[1] :]


GENERATION_CONFIGS = {
    "seed-layers": dict(depth=4, xl_memories_layers=(3, 4), recurrent_layers=(2, 3)),
    "enhanced-recurrence-t5-lstm": dict(
        depth=3,
        recurrent_layers=(3,),
        read_recurrent_layers=(1,),
        position_encoding="t5",
        gate_type="lstm",
    ),
    "peer-window-mqa-compressed": dict(
        sliding_window=False, kv_heads=1, use_compressed_mem=True, compressed_mem_factor=2
    ),
}


@pytest.mark.parametrize("name", list(GENERATION_CONFIGS))
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_cached_generation_equals_generation_by_recomputation(name, temperature):
    model = make_model(**GENERATION_CONFIGS[name])
    wrapper = RecurrentTrainerWrapper(model)
    prime = torch.randint(0, 40, (2, 11))  # longer than max_seq_len = 8: prefilled as 8 + 3
    length = 30  # 19 new tokens over 5 blocks and 3 segments
    cached = wrapper.generate(
        prime, length, temperature=temperature, generator=torch.Generator().manual_seed(5)
    )
    generator = torch.Generator().manual_seed(5)
    expected = recompute_generate(model, prime, length, temperature, 0.9, generator)
    assert cached.shape == (2, length - 11)
    assert torch.equal(cached, expected)


def step_loop_generate(model, prime, length, temperature, filter_thres, generator):
    """The decoding loop written out: ``filter_by_threshold`` then ``sample`` on the logits of
    ``prefill`` and of each ``step`` (what ``generate`` did before it went through
    ``attention_core.generation``)."""
    logits, state = model.prefill(prime)
    new = []
    for n in range(length - prime.shape[1]):
        tokens = sample(filter_by_threshold(logits, filter_thres), temperature, generator=generator)
        new.append(tokens)
        if n + 1 < length - prime.shape[1]:
            logits, state = model.step(tokens, state)
    return torch.stack(new, dim=1)


@pytest.mark.parametrize(
    ("temperature", "filter_thres"),
    [(1.0, 0.9), (0.7, 0.5), (1.5, 0.0), (1.0, 1.0), (0.0, 0.9), (0.3, 0.99)],
)
def test_generate_draws_the_samples_of_the_written_out_loop(temperature, filter_thres):
    """Same generator seed, same tokens: top_k = threshold_top_k(filter_thres, V) in the shared
    loop samples exactly like filter_by_threshold before sampling."""
    model = make_model(dtype=torch.float32, depth=3, recurrent_layers=(2,)).eval()
    wrapper = RecurrentTrainerWrapper(model)
    for batch, prompt in ((1, 1), (3, 6), (2, 13)):
        prime = torch.randint(0, 40, (batch, prompt))
        length = prompt + 21
        got = wrapper.generate(
            prime, length, temperature, filter_thres, generator=torch.Generator().manual_seed(3)
        )
        with torch.no_grad():
            expected = step_loop_generate(
                model, prime, length, temperature, filter_thres, torch.Generator().manual_seed(3)
            )
        assert torch.equal(got, expected)
        # any integer dtype of the prompt, as before
        again = wrapper.generate(
            prime.int(), length, temperature, filter_thres,
            generator=torch.Generator().manual_seed(3),
        )  # fmt: skip
        assert torch.equal(again, expected)


def test_the_model_is_a_step_model():
    assert isinstance(make_model(), StepModel)


def test_generate_defaults_follow_the_seed_signature():
    model = make_model(dtype=torch.float32)
    wrapper = RecurrentTrainerWrapper(model)
    prime = torch.randint(0, 40, (1, 3))
    torch.manual_seed(0)
    out = wrapper.generate(prime, 10)  # temperature=1., filter_thres=0.9
    assert out.shape == (1, 7) and out.dtype == torch.int64
    assert int(out.min()) >= 0 and int(out.max()) < 40
    # filter_thres = 0.9 keeps the top 10 % (4 of 40): every token is among the 4 best
    logits, state = model.prefill(prime)
    for token in out[0]:
        assert int(token) in logits[0].topk(4).indices.tolist()
        logits, state = model.step(token[None], state)


def _record_key_lengths(monkeypatch):
    """Record the key length of every token self-attention (and state cross-attention)."""
    token_keys, state_updates = [], []

    def layer_attend(q, k, v, **kwargs):
        token_keys.append(k.shape[2])
        return original_layer(q, k, v, **kwargs)

    def state_attend(q, k, v, **kwargs):
        state_updates.append(k.shape[2])
        return original_state(q, k, v, **kwargs)

    def layer_attend_window(q, k, v, **kwargs):  # the fast path (all slots valid)
        token_keys.append(k.shape[2])
        return original_window(q, k, v, **kwargs)

    def decode_attend(q, k, v, scale):  # the decoding step inside a block
        token_keys.append(k.shape[2])
        return original_decode(q, k, v, scale)

    original_layer, original_state = layer_module.attend_heads, state_module.attend_heads
    original_window, original_decode = layer_module.attend_window, decode_module._attend
    monkeypatch.setattr(layer_module, "attend_heads", layer_attend)
    monkeypatch.setattr(layer_module, "attend_window", layer_attend_window)
    monkeypatch.setattr(decode_module, "_attend", decode_attend)
    monkeypatch.setattr(state_module, "attend_heads", state_attend)
    return token_keys, state_updates


@pytest.mark.parametrize("fast", [True, False], ids=["fast-step", "general-step"])
@pytest.mark.parametrize("sliding_window", [True, False])
def test_per_token_attention_work_does_not_grow_with_position(monkeypatch, sliding_window, fast):
    width = 8
    model = make_model(
        dtype=torch.float32,
        block_width=width,
        max_seq_len=16,
        depth=2,
        recurrent_layers=(2,),
        sliding_window=sliding_window,
    )
    model._fast_decode = fast
    token_keys, state_updates = _record_key_lengths(monkeypatch)
    logits, state = model.prefill(torch.randint(0, 40, (1, 5)))
    per_step = []
    for position in range(5, 5 + 6 * width):  # six blocks of one-token steps
        token_keys.clear()
        state_updates.clear()
        logits, state = model.step(logits.argmax(dim=-1), state)
        assert max(m.length for m in state.xl_memories) < 2 * width  # the cache stays bounded
        # layer 1 (XL): token keys; layer 2: token keys and its state (S keys)
        per_step.append((position, max(token_keys), len(state_updates)))
    for position, keys, updates in per_step:
        # the fast step (inside a block, after the first) leaves out the token's own key
        general = not fast or position < width or position % width in (0, width - 1)
        if sliding_window:  # exactly the W keys before the token, and its own (masked)
            assert keys == width + int(general), position
        else:  # the peer's window: the previous block and the current one so far
            assert keys == width + 1 + position % width <= 2 * width
        # a state update (self- and cross-attention) exactly when a block completes
        assert updates == (2 if (position + 1) % width == 0 else 0), position
    # the work of a step depends on the position inside the block, never on the stream length
    by_offset = {}
    for position, keys, _ in per_step[width:]:  # after the first block
        by_offset.setdefault(position % width, set()).add(keys)
    assert all(len(v) == 1 for v in by_offset.values())


def test_generation_carries_memories_and_states_across_segments():
    model = make_model(recurrent_layers=(1,), xl_memories_layers=(1, 2))
    wrapper = RecurrentTrainerWrapper(model)
    prime = torch.randint(0, 40, (1, 20))
    changed = prime.clone()
    changed[0, 0] = (changed[0, 0] + 1) % 40  # beyond every window: only the states carry it
    logits = model.prefill(prime)[0]
    logits_changed = model.prefill(changed)[0]
    assert (logits - logits_changed).abs().max() > 1e-9
    greedy = wrapper.generate(prime, 24, temperature=0.0)
    assert torch.equal(greedy, recompute_generate(model, prime, 24, 0.0, 0.9, None))


# ---------------------------------------------------------------- a task only recurrence solves


def _recall_batch(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """A key in ``2..5`` at position 0, fillers (1), the key again at position ``length``."""
    seq = torch.ones(batch, length + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(2, 6, (batch,), generator=generator)
    seq[:, length] = seq[:, 0]
    return seq


def _train_recall(recurrent_layers, steps=40):
    torch.manual_seed(0)
    model = BlockRecurrentTransformer(
        num_tokens=6,
        dim=32,
        depth=1,
        dim_head=16,
        heads=2,
        recurrent_layers=recurrent_layers,
        max_seq_len=16,
        block_width=4,
        num_state_vectors=2,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        seq = _recall_batch(32, 16, generator)
        loss = F.cross_entropy(model(seq[:, :16])[0][:, -1], seq[:, 16])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_recall_beyond_the_window_is_learned_only_with_recurrence():
    # depth 1, W = 4: the last token sees 4 fillers; the key is 15 tokens back
    seq = _recall_batch(256, 16, torch.Generator().manual_seed(1))
    chance = torch.log(torch.tensor(4.0))
    model, baseline = _train_recall((1,)), _train_recall(())
    with torch.no_grad():
        _, mems, states = model(seq[:, :8])
        carried = model(seq[:, 8:16], xl_memories=mems, states=states)[0][:, -1]
        dropped_states = model.reset_states(states, torch.ones(256, dtype=torch.bool))
        dropped = model(seq[:, 8:16], xl_memories=mems, states=dropped_states)[0][:, -1]
        loss_carried = F.cross_entropy(carried, seq[:, 16])
        loss_dropped = F.cross_entropy(dropped, seq[:, 16])
        loss_baseline = F.cross_entropy(baseline(seq[:, :16])[0][:, -1], seq[:, 16])
    assert loss_carried < 0.1, float(loss_carried)
    assert loss_dropped > 0.9 * chance, float(loss_dropped)
    assert loss_baseline > 0.9 * chance, float(loss_baseline)


# ---------------------------------------------------------------- bad inputs


def test_bad_wrapper_arguments():
    model = make_model()
    with pytest.raises(TypeError, match="model must be a BlockRecurrentTransformer; got Linear"):
        RecurrentTrainerWrapper(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"state_dropout must be a probability in \[0, 1\]"):
        RecurrentTrainerWrapper(model, state_dropout=1.5)
    with pytest.raises(ValueError, match="xl_memories_dropout must be a probability"):
        RecurrentTrainerWrapper(model, xl_memories_dropout=-0.1)
    wrapper = RecurrentTrainerWrapper(model)
    with pytest.raises(ValueError, match=r"seq must have shape \(B, n\) with n >= 2; got \(2, 1\)"):
        wrapper(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="seq"):
        wrapper(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"token ids in \[0, 40\)"):
        wrapper(torch.full((2, 5), 40))


def test_bad_generate_arguments():
    wrapper = RecurrentTrainerWrapper(make_model())
    prime = torch.randint(0, 40, (1, 4))
    with pytest.raises(ValueError, match="length must exceed the prime's length 4"):
        wrapper.generate(prime, 4)
    with pytest.raises(ValueError, match="length must be a positive int"):
        wrapper.generate(prime, 0)
    with pytest.raises(ValueError, match="temperature must be a finite float >= 0; got -1"):
        wrapper.generate(prime, 8, temperature=-1.0)
    with pytest.raises(
        ValueError, match=r"filter_thres must be a probability in \[0, 1\]; got 1.5"
    ):
        wrapper.generate(prime, 8, filter_thres=1.5)
    with pytest.raises(TypeError, match="prime"):
        wrapper.generate(prime.float(), 8)
    with pytest.raises(ValueError, match=r"token ids in \[0, 40\)"):
        wrapper.generate(prime + 40, 8)
