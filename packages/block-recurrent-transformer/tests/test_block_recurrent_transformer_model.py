"""BlockRecurrentTransformer against a dense float64 reference, and its stream semantics:
causality, any split of a sequence into calls, memories and states that carry information,
per-row reset, pickling, activation checkpointing, decoding steps and bad inputs.

The reference processes the sequence block by block through all layers, with explicit
``(query, key)`` masks written from the rules of the docs (sliding window of the ``W``
previous tokens, block-local layers, compressed slots of older blocks), explicit softmax
attention, and the state update of each recurrent layer at the end of each complete block.
It uses the model's parameters (projections, norms, gates, feed-forwards), nothing else.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from einops import rearrange

from attention_core.generation import StepModel, generate
from attention_core.testing import assert_close
from block_recurrent_transformer import BlockRecurrentTransformer, LayerMemory, XLMemories


@pytest.fixture(autouse=True)
def _one_thread():
    """Correctness tests on tiny shapes: one intra-op thread keeps them fast on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- dense reference


def _heads(t, h):
    return rearrange(t, "b n (h d) -> b h n d", h=h)


def _dense_attend(q, k, v, mask=None, bias=None, scale=None):
    """softmax(scale q k^T + bias) v with ``mask`` (broadcast to (B, H, I, J)); empty rows -> 0."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    weights = logits.softmax(dim=-1).nan_to_num(0.0)
    return torch.einsum("bhij,bhjd->bhid", weights, v)


def _rotate(model, t, positions):
    angles = model.positions.angles(positions, t.dtype)
    return model.positions.rotate(t, angles)


def _state_kv(module, state, kv_heads):
    normed = module.norm(state) + module.position
    k, v = module.to_kv(normed).chunk(2, dim=-1)
    return normed, module.k_norm(_heads(k, kv_heads)), _heads(v, kv_heads)


def _state_update(model, module, state, token_k, token_v, token_ok):
    heads = model.heads
    normed, k, v = _state_kv(module, state, model.kv_heads)
    q = _heads(module.to_q(normed), 2 * heads)
    q_self, q_cross = module.q_norm(q[:, :heads]), module.q_cross_norm(q[:, heads:])
    scale = module.temperature
    self_out = _dense_attend(q_self, k, v, scale=scale)
    cross_out = _dense_attend(q_cross, token_k, token_v, token_ok[:, None, None, :], scale=scale)
    h = rearrange(torch.cat((self_out, cross_out), dim=1), "b h s d -> b s (h d)")
    z = module.to_out(h)
    if module.gate.__class__.__name__ == "FixedGate":
        g = module.gate.bias.sigmoid()
        new = state * g + z * (1 - g)
    else:
        i, f = module.gate.to_gates(h).chunk(2, dim=-1)
        new = state * torch.sigmoid(f + 1) + torch.tanh(z) * torch.sigmoid(i - 1)
    if module.ff is not None:
        hidden = module.ff_norm(new)
        new = module.ff_gate(hidden, new, module.ff(hidden))
    return new


def _compressed_slots(model, layer, keys, values, block):
    """Compressed keys/values/positions of the slots seen by ``block`` (blocks <= block - 2)."""
    width, comp = model.block_width, layer.compressor
    c, cap = comp.factor, model.compressed_slots
    ks, vs, ps = [], [], []
    for b in range(block - 1):  # blocks 0 .. block - 2
        kb = keys[:, :, b * width : (b + 1) * width]
        vb = values[:, :, b * width : (b + 1) * width]
        group = "b h (e c) d -> b h e (c d)"
        ks.append(comp.to_keys(rearrange(kb, group, c=c)))
        vs.append(comp.to_values(rearrange(vb, group, c=c)))
        ps.append(b * width + torch.arange(width // c) * c + c - 1)
    if not ks:
        return None
    k, v, p = torch.cat(ks, dim=2), torch.cat(vs, dim=2), torch.cat(ps)
    return k[:, :, -cap:], v[:, :, -cap:], p[-cap:]


def reference(model: BlockRecurrentTransformer, seq: torch.Tensor) -> torch.Tensor:
    """Logits of ``seq`` from a fresh stream, computed densely block by block."""
    width, heads, kv = model.block_width, model.heads, model.kv_heads
    batch, n = seq.shape
    x = model.token_emb(seq)
    writers = model.recurrent_layers
    reader = dict(zip(writers, model.read_recurrent_layers))
    states = {w: model.layers[w - 1].state.initial.expand(batch, -1, -1) for w in writers}
    keys = [None] * model.depth
    values = [None] * model.depth
    outputs = []
    for block in range(math.ceil(n / width)):
        h = x[:, block * width : (block + 1) * width]
        before = dict(states)
        t = torch.arange(block * width, block * width + h.shape[1])
        for index, layer in enumerate(model.layers):
            number = index + 1
            xn = layer.norm(h)
            q = _heads(layer.to_q(xn), heads)
            k, v = layer.to_kv(xn).chunk(2, dim=-1)
            k, v = _heads(k, kv), _heads(v, kv)
            scale = None
            if layer.spec.qk_norm:
                q, k, scale = layer.q_norm(q), layer.k_norm(k), layer.temperature
            keys[index] = k if keys[index] is None else torch.cat((keys[index], k), dim=2)
            values[index] = v if values[index] is None else torch.cat((values[index], v), dim=2)
            s = torch.arange(keys[index].shape[2])
            ti, sj = t[:, None], s[None, :]
            if number in model.xl_memories_layers:
                if model.sliding_window:
                    mask = (sj < ti) & (sj >= ti - width)
                else:
                    mask = (sj <= ti) & (sj >= (ti // width - 1) * width)
            else:
                same = (sj // width) == (ti // width)
                mask = same & ((sj < ti) if model.sliding_window else (sj <= ti))
            ks, vs, ps = keys[index], values[index], s
            if layer.compressor is not None:
                slots = _compressed_slots(model, layer, keys[index], values[index], block)
                if slots is not None:
                    ks, vs = torch.cat((slots[0], ks), dim=2), torch.cat((slots[1], vs), dim=2)
                    ps = torch.cat((slots[2], s))
                    mask = torch.cat((mask.new_ones(len(t), len(slots[2])), mask), dim=1)
            bias = model.positions.bias(t, ps, q.dtype)
            out = _dense_attend(_rotate(model, q, t), _rotate(model, ks, ps), vs, mask, bias, scale)
            outs = [out]
            read_from = [w for w in writers if reader[w] == number]
            read_from.sort(key=lambda w: (w != number, w))  # own state first
            if read_from:
                rq = layer.read_q_norm(_heads(layer.to_read_q(xn), heads * len(read_from)))
                for i, w in enumerate(read_from):
                    _, sk, sv = _state_kv(model.layers[w - 1].state, before[w], kv)
                    outs.append(
                        _dense_attend(rq[:, i * heads : (i + 1) * heads], sk, sv, scale=scale)
                    )
            h = h + layer.to_out(rearrange(torch.cat(outs, dim=1), "b h n d -> b n (h d)"))
            h = h + layer.ff(layer.ff_norm(h))
            if number in writers and h.shape[1] == width:
                lookback = layer.spec.state_lookback
                lo = max(0, block * width - lookback)
                wk = keys[index][:, :, lo : (block + 1) * width]
                wv = values[index][:, :, lo : (block + 1) * width]
                ok = torch.ones(batch, wk.shape[2], dtype=torch.bool)
                states[number] = _state_update(model, layer.state, before[number], wk, wv, ok)
        outputs.append(h)
    return model.to_logits(model.final_norm(torch.cat(outputs, dim=1)))


# ---------------------------------------------------------------- helpers

SMALL = dict(num_tokens=40, dim=16, dim_head=4, heads=4, block_width=4, num_state_vectors=3)

CONFIGS = {
    "default": dict(depth=3),
    "seed-layers": dict(depth=4, xl_memories_layers=(3, 4), recurrent_layers=(2, 3)),
    "peer-window-mqa": dict(
        depth=2, sliding_window=False, kv_heads=1, state_attends_previous_block=False
    ),
    "dynamic-bias-gqa": dict(depth=2, position_encoding="dynamic", kv_heads=2),
    "t5-lstm-ffn": dict(depth=2, position_encoding="t5", gate_type="lstm", state_ffn=True),
    "enhanced-recurrence": dict(depth=3, recurrent_layers=(3,), read_recurrent_layers=(1,)),
    "two-writers-mixed-reads": dict(
        depth=4, recurrent_layers=(2, 4), read_recurrent_layers=(1, 4), xl_memories_layers=(1, 3)
    ),
    "compressed-mem": dict(depth=2, use_compressed_mem=True, compressed_mem_factor=2),
    "compressed-mem-w8": dict(
        depth=2,
        block_width=8,
        use_compressed_mem=True,
        compressed_mem_factor=4,
        position_encoding="dynamic",
    ),
    "no-recurrence": dict(depth=2, recurrent_layers=(), position_encoding=None),
    "depth-1": dict(depth=1),
}


def make_model(name="default", dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = {**SMALL, **CONFIGS[name], **overrides}
    return BlockRecurrentTransformer(**kwargs).to(dtype)


def run_in_pieces(model, seq, cuts, **kwargs):
    outs, mems, states, prev = [], None, None, 0
    for cut in [*cuts, seq.shape[1]]:
        out, mems, states = model(seq[:, prev:cut], xl_memories=mems, states=states, **kwargs)
        outs.append(out)
        prev = cut
    return torch.cat(outs, dim=1), mems, states


# ---------------------------------------------------------------- the seed example


def test_seed_example_as_written():
    model = BlockRecurrentTransformer(
        num_tokens=2000,
        dim=512,
        depth=4,
        dim_head=64,
        heads=8,
        xl_memories_layers=(3, 4),
        recurrent_layers=(2, 3),
    )
    seq = torch.randint(0, 2000, (1, 1024))
    with torch.no_grad():
        out, mems1, states1 = model(seq)
        out, mems2, states2 = model(seq, xl_memories=mems1, states=states1)
        out, mems3, states3 = model(seq, xl_memories=mems2, states=states2)
    assert out.shape == (1, 1024, 2000)
    assert [s.shape for s in states3] == [(1, 512, 512)] * 2
    assert mems3.position == 3 * 1024
    # layers 1 and 2 stay inside their block (1024 = 2 blocks: nothing pending), layer 2's
    # state update and layers 3, 4 keep the previous block
    assert [m.length for m in mems3] == [0, 512, 512, 512]
    assert not torch.equal(states2[0], states3[0])


# ---------------------------------------------------------------- against the reference


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("length", [1, 7, 13], ids=lambda n: f"n{n}")
def test_matches_dense_reference(name, length):
    model = make_model(name)
    seq = torch.randint(0, 40, (2, length if "w8" not in name else 3 * length))
    out, mems, _states = model(seq)
    assert_close(f"logits[{name}]", out, reference(model, seq))
    assert mems.position == seq.shape[1]


def test_matches_reference_in_float32():
    model = make_model("seed-layers", dtype=torch.float32)
    seq = torch.randint(0, 40, (3, 11))
    expected = reference(make_model("seed-layers"), seq).float()
    assert_close("logits", model(seq)[0], expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- stream semantics


@pytest.mark.parametrize(
    "name", ["default", "seed-layers", "enhanced-recurrence", "compressed-mem"]
)
@pytest.mark.parametrize(
    "cuts",
    [[4, 8, 12], [1, 2, 3, 9, 10], [3, 6, 11, 17], list(range(1, 23))],
    ids=["block-aligned", "ragged", "mid-block", "one-token-steps"],
)
def test_one_call_equals_any_split(name, cuts):
    model = make_model(name)
    seq = torch.randint(0, 40, (2, 23))
    full, mems, states = model(seq)
    pieces, mems_p, states_p = run_in_pieces(model, seq, cuts)
    assert_close("logits", pieces, full)
    for i, (a, b) in enumerate(zip(states_p, states)):
        assert_close(f"states[{i}]", a, b)
    for i, (a, b) in enumerate(zip(mems_p, mems)):
        assert_close(f"mems[{i}].keys", a.keys, b.keys)
        assert torch.equal(a.valid, b.valid)


def test_causal_within_a_call():
    model = make_model("seed-layers")
    seq = torch.randint(0, 40, (1, 15))
    out = model(seq)[0]
    for t in (0, 5, 9, 14):
        changed = seq.clone()
        changed[0, t] = (changed[0, t] + 1) % 40
        out2 = model(changed)[0]
        assert_close(f"logits before {t}", out2[:, :t], out[:, :t])
        assert not torch.allclose(out2[:, t:], out[:, t:])


@pytest.mark.parametrize("call_length", [1, 3, 4, 6], ids=lambda n: f"len{n}")
def test_memories_and_states_returned_and_consistent_for_any_length(call_length):
    model = make_model("seed-layers")
    mems, states, position = None, None, 0
    for _ in range(4):
        _, mems, states = model(
            torch.randint(0, 40, (2, call_length)), xl_memories=mems, states=states
        )
        position += call_length
        r = position % 4
        assert mems.position == position
        # layers 1 (block-local) keeps the current block, 2 (state reads the previous block),
        # 3 and 4 (XL) keep the previous block too
        assert [m.length for m in mems] == [
            r,
            min(position, 4 + r),
            min(position, 4 + r),
            min(position, 4 + r),
        ]
        assert len(states) == 2 and all(s.shape == (2, 3, 16) for s in states)
        assert all(not m.keys.requires_grad for m in mems) and not states[0].requires_grad


def test_states_and_memories_carry_information_across_calls():
    model = make_model("seed-layers")
    first = torch.randint(0, 40, (1, 8))
    second = torch.randint(0, 40, (1, 12))
    _, mems, states = model(first)
    out = model(second, xl_memories=mems, states=states)[0]

    perturbed = first.clone()
    perturbed[0, 0] = (perturbed[0, 0] + 1) % 40  # far behind every attention window
    _, mems_p, states_p = model(perturbed)
    out_p = model(second, xl_memories=mems_p, states=states_p)[0]
    assert (out_p[:, -4:] - out[:, -4:]).abs().max() > 1e-6, "the state must carry the old token"

    fresh_states = model.reset_states(states, torch.tensor([True]))
    out_reset = model(second, xl_memories=mems, states=fresh_states)[0]
    assert (out_reset - out).abs().max() > 1e-6
    out_forget = model(second, xl_memories=mems.drop(torch.tensor([True])), states=states)[0]
    assert (out_forget[:, :4] - out[:, :4]).abs().max() > 1e-6


def test_without_recurrence_nothing_travels_beyond_the_windows():
    model = make_model(
        "no-recurrence"
    )  # depth 2, W = 4: nothing older than 8 tokens reaches a token
    seq = torch.randint(0, 40, (1, 20))
    out = model(seq)[0]
    changed = seq.clone()
    changed[0, 0] = (changed[0, 0] + 1) % 40
    assert_close("logits", model(changed)[0][:, 9:], out[:, 9:])


def test_reset_rows_start_a_fresh_stream_and_leave_other_rows_alone():
    model = make_model("compressed-mem")
    history = torch.randint(0, 40, (3, 12))
    seq = torch.randint(0, 40, (3, 9))
    _, mems, states = model(history)
    expected, _, _ = model(seq, xl_memories=mems, states=states)
    rows = torch.tensor([False, True, False])
    out, _, _ = model(seq, xl_memories=mems, states=states, reset=rows)
    assert_close("kept rows", out[~rows], expected[~rows])
    assert_close("reset row", out[1:2], model(seq[1:2])[0])


def test_reset_mid_block_forgets_the_old_document():
    model = make_model("default")
    seq = torch.randint(0, 40, (2, 7))
    _, mems, states = model(torch.randint(0, 40, (2, 6)))  # 2 tokens into a block
    out = model(seq, xl_memories=mems, states=states, reset=torch.tensor([True, True]))[0]
    _, mems2, states2 = model(torch.randint(0, 40, (2, 6)))  # another old document
    out2 = model(seq, xl_memories=mems2, states=states2, reset=torch.tensor([True, True]))[0]
    assert_close("independent of the forgotten past", out, out2)


# ---------------------------------------------------------------- training plumbing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_loss_and_gradients_reach_every_parameter(dtype):
    model = make_model("two-writers-mixed-reads", dtype=dtype, position_encoding="dynamic")
    seq = torch.randint(0, 40, (2, 14))
    loss, mems, _states = model(seq, return_loss=True)
    logits = model(seq[:, :-1])[0]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), seq[:, 1:].reshape(-1))
    assert_close("loss", loss, expected)
    assert mems.position == 13
    loss.backward()
    missing = [
        name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert missing == []


def test_loss_ignores_ignore_index_labels():
    model = make_model("default", ignore_index=-1)
    seq = torch.randint(0, 40, (1, 9))
    labelled = seq.clone()
    labelled[0, -1] = -1
    loss = model(labelled, return_loss=True)[0]
    logits = model(seq[:, :-1])[0]
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], seq[0, 1:-1])
    assert_close("loss", loss, expected)


@pytest.mark.parametrize("name", ["two-writers-mixed-reads", "t5-lstm-ffn", "dynamic-bias-gqa"])
def test_activation_checkpointing_gives_the_same_gradients(name):
    seq = torch.randint(0, 40, (2, 10))
    grads = []
    for checkpoint_layers in (False, True):
        model = make_model(name, checkpoint_layers=checkpoint_layers)
        model.train()
        model(seq, return_loss=True)[0].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert_close(name, grads[1][name], g)


@pytest.mark.parametrize("name", ["default", "t5-lstm-ffn"])
def test_a_recurrent_layer_can_be_checkpointed_by_hand(name):
    model = make_model(name)
    seq = torch.randint(0, 40, (1, 9))
    layer = model.layers[1]  # the recurrent layer
    calls = []
    original = layer.forward

    def checkpointed(*args):
        calls.append(1)
        return torch.utils.checkpoint.checkpoint(original, *args, use_reentrant=False)

    loss = model(seq, return_loss=True)[0]
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    layer.forward = checkpointed
    model(seq, return_loss=True)[0].backward()
    assert calls
    for name, g in expected.items():
        assert_close(name, dict(model.named_parameters())[name].grad, g)


def test_torch_save_round_trip():
    model = make_model("compressed-mem")
    seq = torch.randint(0, 40, (1, 9))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    out, mems, states = model(seq)
    out2, _mems2, _states2 = loaded(seq)
    assert_close("logits", out2, out)
    buffer = io.BytesIO()
    torch.save({"mems": mems, "states": states}, buffer)  # memories pickle too
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    assert_close(
        "continued", loaded(seq, saved["mems"], saved["states"])[0], model(seq, mems, states)[0]
    )


def test_default_recurrent_layer_at_depth_1():
    model = BlockRecurrentTransformer(
        num_tokens=10, dim=8, depth=1, dim_head=4, heads=2, block_width=4
    )
    assert model.recurrent_layers == (1,)
    out, _mems, states = model(torch.randint(0, 10, (1, 6)))
    assert out.shape == (1, 6, 10) and len(states) == 1 and states[0].shape == (1, 4, 8)


# ---------------------------------------------------------------- decoding steps


def test_prefill_and_steps_match_forward():
    model = make_model("seed-layers", max_seq_len=5)
    seq = torch.randint(0, 40, (2, 14))
    full = model(seq)[0]
    logits, state = model.prefill(seq[:, :7])  # consumed as 5 + 2
    assert_close("prefill", logits, full[:, 6])
    for t in range(7, 14):
        logits, state = model.step(seq[:, t], state)
        assert_close(f"step {t}", logits, full[:, t])
    assert state.xl_memories.position == 14


def test_model_is_a_step_model_for_attention_core_generation():
    model = make_model("default")
    assert isinstance(model, StepModel)
    prompt = torch.randint(0, 40, (2, 3))
    out = generate(model, prompt, 6, temperature=0.0)
    expected = prompt
    for _ in range(6):
        next_token = model(expected)[0][:, -1].argmax(dim=-1)
        expected = torch.cat((expected, next_token[:, None]), dim=1)
    assert torch.equal(out, expected)


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            dict(recurrent_layers=(0,)),
            ValueError,
            r"recurrent_layers must contain layers in 1\.\.2",
        ),
        (dict(recurrent_layers=(1, 1)), ValueError, "must not repeat"),
        (
            dict(xl_memories_layers=(3,)),
            ValueError,
            r"xl_memories_layers must contain layers in 1\.\.2",
        ),
        (dict(xl_memories_layers=2), TypeError, "xl_memories_layers must be a tuple"),
        (
            dict(recurrent_layers=(1,), read_recurrent_layers=(2,)),
            ValueError,
            "must be <= its recurrent",
        ),
        (dict(read_recurrent_layers=(1, 1)), ValueError, "one layer per recurrent layer"),
        (dict(kv_heads=3), ValueError, "kv_heads must divide heads = 4; got 3"),
        (dict(block_width=0), ValueError, "block_width must be a positive int; got 0"),
        (dict(gate_type="gru"), ValueError, "gate_type must be one of"),
        (dict(position_encoding="alibi"), ValueError, "position_encoding must be one of"),
        (
            dict(use_compressed_mem=True, compressed_mem_factor=3),
            ValueError,
            "compressed_mem_factor",
        ),
        (dict(sliding_window=1), TypeError, "sliding_window must be a bool"),
        (dict(ff_mult=0), ValueError, "ff_mult must be a positive number; got 0"),
    ],
    ids=lambda v: str(v)[:40] if isinstance(v, dict) else None,
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        BlockRecurrentTransformer(**{**SMALL, "depth": 2, **kwargs})


def test_unused_compressed_mem_factor_is_not_used():
    model = BlockRecurrentTransformer(**{**SMALL, "depth": 2}, compressed_mem_factor=None)
    assert model.config.max_distance == 2 * model.block_width


def test_bad_tokens():
    model = make_model("default", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"token ids in \[0, 40\); got values in \[0, 40\]"):
        model(torch.tensor([[0, 40]]))
    with pytest.raises(ValueError, match=r"token ids in \[0, 40\); got values in \[-1, 3\]"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match=r"seq must be an integer tensor; got dtype torch\.float32"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="seq must have 2 dimensions"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"n >= 2"):
        model(torch.zeros(1, 1, dtype=torch.long), return_loss=True)
    with pytest.raises(ValueError, match="or ignore_index = -100; got 77"):
        model(torch.tensor([[1, 2, 77]]), return_loss=True)


def test_missing_or_foreign_memories_and_states():
    model = make_model("default", dtype=torch.float32)
    seq = torch.randint(0, 40, (2, 5))
    _, mems, states = model(seq)
    with pytest.raises(ValueError, match="states is required when xl_memories is given"):
        model(seq, xl_memories=mems)
    with pytest.raises(ValueError, match="xl_memories is required when states is given"):
        model(seq, states=states)
    with pytest.raises(TypeError, match="xl_memories must be the XLMemories"):
        model(seq, xl_memories=list(mems), states=states)
    with pytest.raises(ValueError, match="xl_memories is required when states is given"):
        model(seq, xl_memories=[], states=states)
    with pytest.raises(ValueError, match="xl_memories is required when states is given"):
        model(seq, states=5)  # not a list: the same error, not a TypeError from len()
    fresh = model(seq)[0]  # the peer's empty lists start a new stream
    assert torch.equal(model(seq, xl_memories=[], states=[])[0], fresh)
    with pytest.raises(ValueError, match="one tensor per recurrent layer"):
        model(seq, xl_memories=mems, states=states + states)
    with pytest.raises(
        ValueError,
        match=r"states\[0\] must have shape \(B, num_state_vectors, dim\) = \(2, 3, 16\)",
    ):
        model(seq, xl_memories=mems, states=[states[0][:, :2]])
    with pytest.raises(
        TypeError, match=r"states\[0\] must have dtype torch.float32; got torch.float64"
    ):
        model(seq, xl_memories=mems, states=[states[0].double()])
    with pytest.raises(
        ValueError, match=r"xl_memories\[0\].keys must have shape .* = \(1, 4, 5, 4\)"
    ):
        model(seq[:1], xl_memories=mems, states=[s[:1] for s in states])
    other = make_model("depth-1", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"one LayerMemory per layer \(1\); got 3"):
        other(seq, xl_memories=mems, states=states)
    wide = make_model("default", dtype=torch.float32, kv_heads=1)
    with pytest.raises(ValueError, match=r"xl_memories\[0\].keys must have shape"):
        wide(seq, xl_memories=mems, states=states)
    stale = XLMemories(mems.position + 1, list(mems.layers))
    with pytest.raises(ValueError, match="out of sync"):
        model(seq, xl_memories=stale, states=states)
    compressing = make_model(
        "default", dtype=torch.float32, use_compressed_mem=True, compressed_mem_factor=2
    )
    with pytest.raises(
        ValueError, match=r"xl_memories\[0\] lacks a compressed memory but the layer uses one"
    ):
        compressing(seq, xl_memories=mems, states=states)
    with pytest.raises(ValueError, match=r"reset must have shape \(2,\); got \(3,\)"):
        model(seq, xl_memories=mems, states=states, reset=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"rows must have dtype torch\.bool"):
        mems.drop(torch.ones(2))
    assert isinstance(mems[0], LayerMemory)


def test_bad_step_inputs():
    model = make_model("default", dtype=torch.float32)
    _, state = model.prefill(torch.randint(0, 40, (2, 3)))
    with pytest.raises(ValueError, match=r"tokens must have shape \(2,\); got \(3,\)"):
        model.step(torch.zeros(3, dtype=torch.long), state)
    with pytest.raises(TypeError, match="state must be a DecodeState"):
        model.step(torch.zeros(2, dtype=torch.long), None)
    with pytest.raises(ValueError, match=r"token ids in \[0, 40\)"):
        model.step(torch.full((2,), 40), state)


# ---------------------------------------------------------------- the peer's defects, absent


def test_qk_norm_temperature_is_used():
    seq = torch.randint(0, 40, (1, 9))
    outs = [make_model("default", qk_rmsnorm_scale=scale)(seq)[0] for scale in (8.0, 2.0)]
    assert (outs[0] - outs[1]).abs().max() > 1e-3
    model = make_model("default", qk_rmsnorm_scale=2.0, all_layers_qk_rmsnorm=True)
    assert all(layer.temperature == 2.0 for layer in model.layers)
    assert all(layer.spec.qk_norm for layer in model.layers)


def test_no_deprecation_warnings_in_training_and_generation():
    import warnings

    model = make_model("seed-layers", dtype=torch.float32, checkpoint_layers=True).train()
    seq = torch.randint(0, 40, (2, 11))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch.backends.cuda.sdp_kernel is deprecated
        model(seq, return_loss=True)[0].backward()
        logits, state = model.prefill(seq)
        model.step(logits.argmax(dim=-1), state)


# ---------------------------------------------------------------- fast paths


@pytest.mark.parametrize("dim_head", [8, 7])
def test_rotation_table_equals_attention_core_rotary(dim_head):
    from attention_core.nn import apply_rotary_pos_emb
    from block_recurrent_transformer.attention import PositionEncoding

    positions = PositionEncoding("rotary", 2, dim_head, mlp_dim=8, max_distance=32)
    pos = torch.arange(-5, 7)
    t = torch.randn(3, 2, 12, dim_head, dtype=torch.float64)
    expected = apply_rotary_pos_emb(positions.rotary(pos, dtype=torch.float64), t)
    assert_close("rotated", positions.rotate(t, positions.angles(pos, torch.float64)), expected)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [False, True])
def test_attend_window_equals_masked_attention(kv_heads, with_bias):
    from block_recurrent_transformer.attention import attend_heads, attend_window

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 5, 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(3, kv_heads, 9, 8, dtype=torch.float64, generator=g) for _ in "kv")
    mask = torch.rand(1, 1, 5, 9, generator=g) < 0.6
    mask[..., 0] = True  # every row sees a key
    bias = torch.randn(1, 4, 5, 9, dtype=torch.float64, generator=g) if with_bias else None
    base = bias if with_bias else torch.zeros(1, 1, 5, 9, dtype=torch.float64)
    additive = base.masked_fill(~mask, float("-inf"))
    expected = attend_heads(q, k, v, mask=mask, bias=bias, scale=0.7)
    assert_close("window", attend_window(q, k, v, additive=additive, scale=0.7), expected)
    # a mask per batch row (invalid key slots of some rows)
    valid = torch.rand(3, 9, generator=g) < 0.7
    valid[:, 0] = True
    rows = mask & valid[:, None, None, :]
    expected = attend_heads(q, k, v, mask=rows, bias=bias, scale=0.7)
    per_row = additive.masked_fill(~valid[:, None, None, :], float("-inf"))
    assert_close("per row", attend_window(q, k, v, additive=per_row, scale=0.7), expected)


@pytest.mark.parametrize("sdpa_gqa", [True, False], ids=["enable_gqa", "torch<2.5"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("use_window", [False, True], ids=["attend_heads", "attend_window"])
def test_shared_key_heads_equal_repeated_keys_with_gradients(
    monkeypatch, kv_heads, use_window, sdpa_gqa
):
    import block_recurrent_transformer.attention as attention_module
    from block_recurrent_transformer.attention import attend_heads, attend_window

    monkeypatch.setattr(attention_module, "_SDPA_SHARES_HEADS", sdpa_gqa)

    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k, v = (
        torch.randn(3, kv_heads, 9, 8, dtype=torch.float64, generator=g, requires_grad=True)
        for _ in "kv"
    )
    valid = torch.rand(3, 1, 1, 9, generator=g) < 0.7  # a mask per batch row for the window
    valid[..., 0] = True
    additive = torch.zeros(3, 1, 1, 9, dtype=torch.float64).masked_fill(~valid, float("-inf"))
    if use_window:
        out = attend_window(q, k, v, additive=additive, scale=0.7)
    else:
        out = attend_heads(q, k, v, scale=0.7)
    repeat = 4 // kv_heads
    scores = 0.7 * q @ k.repeat_interleave(repeat, dim=1).transpose(-1, -2)
    if use_window:
        scores = scores + additive
    expected = scores.softmax(dim=-1) @ v.repeat_interleave(repeat, dim=1)
    assert_close("output", out, expected)
    weights = torch.randn(out.shape, dtype=torch.float64, generator=g)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for name, a, b in zip("qkv", grads, expected_grads):
        assert_close(f"d{name}", a, b)
