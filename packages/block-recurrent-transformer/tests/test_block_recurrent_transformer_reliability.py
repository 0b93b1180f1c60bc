"""Reliability of the Block-Recurrent Transformer: identical training under DDP and FSDP
(2 gloo processes) and in one process; ``torch.compile`` of a forward call matching eager;
``torch.save`` / ``torch.load(weights_only=True)`` of weights, memories and states resuming to
identical outputs; empty batches and length-1 sequences through forward and generation.

Graph breaks under ``torch.compile``: none (the test compiles with ``fullgraph=True``). The
data-dependent checks of eager mode (token ids in range, "are all memory slots valid?" to skip
the validity mask) are skipped while compiling: the mask is then always applied, which gives
the same result.
"""

from __future__ import annotations

import functools
import io

import pytest
import torch

from attention_core.testing import assert_close
from attention_core.testing.distributed import check_data_parallel
from block_recurrent_transformer import (
    BlockRecurrentTransformer,
    LayerMemory,
    RecurrentTrainerWrapper,
    XLMemories,
)

SMALL = dict(num_tokens=17, dim=16, depth=2, dim_head=8, heads=2, block_width=4,
             num_state_vectors=3, max_seq_len=8)  # fmt: skip


def small_model(**overrides) -> BlockRecurrentTransformer:
    torch.manual_seed(0)
    return BlockRecurrentTransformer(**{**SMALL, **overrides}).eval()


@pytest.mark.slow  # spawns two gloo processes per strategy
def test_language_model_trains_identically_under_ddp_and_fsdp():
    # 10 tokens per row: the call crosses two block boundaries (state updates) and ends
    # inside a block; no dropout anywhere, so every run sees the same computation
    batches = torch.randint(0, 17, (2, 4, 11), generator=torch.Generator().manual_seed(0))
    cases = {
        "paper defaults": (functools.partial(BlockRecurrentTransformer, **SMALL), batches, "lm"),
        "peer options": (
            functools.partial(
                BlockRecurrentTransformer, **SMALL, kv_heads=1, sliding_window=False,
                state_attends_previous_block=False,
            ),
            batches,
            "lm",
        ),
    }  # fmt: skip
    differences = check_data_parallel(cases)
    assert set(differences) == {(c, s) for c in cases for s in ("ddp", "fsdp")}
    assert max(differences.values()) < 1e-5


def test_compiled_forward_matches_eager_without_graph_breaks():
    model = small_model()
    seq = torch.randint(0, 17, (2, 6), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        eager_out, eager_mems, eager_states = model(seq)
        out, mems, states = compiled(seq)
    assert_close("compiled logits", out, eager_out)
    assert mems.position == eager_mems.position == 6
    for got, want in zip(mems, eager_mems):
        assert_close("compiled memory keys", got.keys, want.keys)
        assert torch.equal(got.valid, want.valid)
    assert_close("compiled state", states[0], eager_states[0])


def _round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_weights_memories_and_states_round_trip_through_weights_only_load():
    model = small_model(use_compressed_mem=True, compressed_mem_factor=2)
    seq = torch.randint(0, 17, (2, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, mems, states = model(seq[:, :9])  # ends inside a block, compressed memory in use
        expected = model(seq[:, 9:], xl_memories=mems, states=states)

        clone = BlockRecurrentTransformer(**SMALL, use_compressed_mem=True,
                                          compressed_mem_factor=2).eval()  # fmt: skip
        clone.load_state_dict(_round_trip(model.state_dict()))
        loaded = _round_trip({"mems": mems, "states": states})
        assert isinstance(loaded["mems"], XLMemories)
        assert isinstance(loaded["mems"][0], LayerMemory)
        assert loaded["mems"].position == 9
        resumed = clone(seq[:, 9:], xl_memories=loaded["mems"], states=loaded["states"])
    assert torch.equal(resumed[0], expected[0])
    assert torch.equal(resumed[2][0], expected[2][0])
    for got, want in zip(resumed[1], expected[1]):
        assert torch.equal(got.keys, want.keys)
        assert torch.equal(got.compressed_keys, want.compressed_keys)


@pytest.mark.parametrize("length", [1, 6])
def test_empty_batches_pass_through_forward_and_generation(length):
    model = small_model()
    with torch.no_grad():
        out, mems, states = model(torch.zeros(0, length, dtype=torch.long))
        assert out.shape == (0, length, 17)
        assert mems.position == length and mems[0].keys.shape[0] == 0
        assert states[0].shape == (0, 3, 16)
        out, _, _ = model(torch.zeros(0, 3, dtype=torch.long), xl_memories=mems, states=states)
        assert out.shape == (0, 3, 17)
    new = RecurrentTrainerWrapper(model).generate(torch.zeros(0, length, dtype=torch.long), 9)
    assert new.shape == (0, 9 - length)


def test_length_one_sequences_pass_through_forward_and_generation():
    model = small_model()
    seq = torch.randint(0, 17, (3, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = model(seq)[0]
        mems, states, pieces = None, None, []
        for t in range(seq.shape[1]):  # one token per call, across block boundaries
            out, mems, states = model(seq[:, t : t + 1], xl_memories=mems, states=states)
            assert out.shape == (3, 1, 17)
            pieces.append(out)
    assert_close("token-by-token logits", torch.cat(pieces, dim=1), whole, atol=1e-5, rtol=1e-4)
    new = RecurrentTrainerWrapper(model).generate(seq[:, :1], 2, temperature=0.0)
    assert new.shape == (3, 1)
    assert torch.equal(new[:, 0], whole[:, 0].argmax(-1))
