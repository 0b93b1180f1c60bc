"""The inference path (a forward without gradients, and decoding) computes the paper path's
function in float64: for windows of 1, 2, 3 and 8 steps, batches of 1 and 2, with cross
attention, with a memory that the call pushes past ``mem_len`` (and, decoding, a ring buffer
that wraps around), on the core's prepared sublayer ops at every row count."""

from __future__ import annotations

import pytest
import torch

from feedback_transformer import FeedbackTransformer, _inference_window, _window_chain, generation
from feedback_transformer._window_attention import window_bias

VOCAB, DIM, HEADS, DIM_HEAD = 13, 16, 2, 8


def random_model(seq_len, mem_len, cross_attend=False, keep_last_hidden=False, seed=0):
    """A float64 model whose parameters are all far from their (often zero) initial values."""
    torch.manual_seed(seed)
    model = FeedbackTransformer(
        num_tokens=VOCAB, dim=DIM, depth=2, seq_len=seq_len, mem_len=mem_len, heads=HEADS,
        dim_head=DIM_HEAD, cross_attend=cross_attend, keep_last_hidden=keep_last_hidden,
    ).double()  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


def paper(model, *args, **kwargs):
    """``model(*args, **kwargs)`` on the paper path (`feedback_transformer.reference`)."""
    model.use_fast_path = False
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    finally:
        model.use_fast_path = True


def assert_close(name, actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")


CASES = [  # (seq_len, mem_len, batch, n, cross_attend, prefix length)
    pytest.param(1, 4, 1, 9, False, 0, id="W1-b1-wraps"),
    pytest.param(1, 3, 2, 7, True, 2, id="W1-b2-cross-prefix"),
    pytest.param(2, 5, 1, 11, False, 3, id="W2-b1-prefix-tail"),
    pytest.param(2, 4, 2, 12, True, 0, id="W2-b2-cross"),
    pytest.param(3, 4, 2, 10, False, 6, id="W3-b2-prefix-longer-than-mem_len"),
    pytest.param(3, 0, 1, 7, False, 0, id="W3-b1-no-memory"),
    pytest.param(8, 6, 2, 19, False, 0, id="W8-b2-tail"),
    pytest.param(8, 20, 1, 5, True, 4, id="W8-b1-one-short-window-cross"),
]


@pytest.fixture(params=["chain", "layers"])
def window_path(request, monkeypatch):
    """Run the windows of a forward without gradients as step chains (where they serve: a
    memory, no context) or layer by layer; returns the path and the list of the chains'
    windows."""
    windows = []
    if request.param == "layers":
        monkeypatch.setattr(_inference_window, "chain_serves", lambda *args: False)
    else:
        original = _window_chain.WindowChains.__call__

        def spy(self, x, lo, hi):
            windows.append((x.shape[0], lo, hi))
            return original(self, x, lo, hi)

        monkeypatch.setattr(_window_chain.WindowChains, "__call__", spy)
    return request.param, windows


@pytest.mark.parametrize(("W", "M", "b", "n", "cross", "prefix_len"), CASES)
def test_forward_without_gradients_equals_paper_path(W, M, b, n, cross, prefix_len, window_path):
    model = random_model(W, M, cross_attend=cross)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (b, n), generator=g)
    kwargs = {}
    if cross:
        context = torch.randn(b, 3, DIM, generator=g, dtype=torch.float64)
        kwargs = dict(context=context, context_mask=torch.tensor([[True, False, True]] * b))
    if prefix_len:
        shape = (b, HEADS, prefix_len, DIM_HEAD)
        kwargs["memory"] = tuple(torch.randn(shape, generator=g, dtype=torch.float64) for _ in "kv")
    expected, expected_memory = paper(model, x, return_memory=True, **kwargs)
    with torch.no_grad():
        logits, memory = model(x, return_memory=True, **kwargs)
    assert_close("logits", logits, expected)
    assert_close("memory keys", memory.keys, expected_memory.keys)
    assert_close("memory values", memory.values, expected_memory.values)
    assert memory.keys.shape[2] == min(M, prefix_len + n)
    path, windows = window_path
    chained = path == "chain" and M > 0 and not cross  # then one chain call per window
    assert len(windows) == (-(-n // W) if chained else 0)


@pytest.mark.parametrize("keep_last_hidden", [False, True])
@pytest.mark.parametrize(("W", "n"), [(1, 6), (2, 7), (3, 9)])
def test_forward_chains_in_float32_equal_layers(W, n, keep_last_hidden, monkeypatch):
    """In float32 the chains (their compiled kernels) and the layer-by-layer windows agree to
    float32 rounding, logits and kept memory, with the layers' states mixed or not."""
    model = random_model(W, 5, keep_last_hidden=keep_last_hidden, seed=4).float()
    x = torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits, memory = model(x, return_memory=True)
        monkeypatch.setattr(_inference_window, "chain_serves", lambda *args: False)
        expected, expected_memory = model(x, return_memory=True)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(memory.keys, expected_memory.keys, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(memory.values, expected_memory.values, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chain", [True, False])
@pytest.mark.parametrize(("W", "b", "cross"), [
    (1, 1, False), (1, 2, True), (2, 2, False), (3, 1, True), (8, 2, False), (1, 3, False),
])  # fmt: skip
def test_decoding_past_a_full_ring_equals_paper_path(W, b, cross, chain, monkeypatch):
    """Decoding 3 times ``mem_len`` steps: the ring buffer wraps around (several times). With
    ``seq_len = 1`` and no context a step runs as one step chain (`chain`), else (and with
    the chains turned off) window by window."""
    if not chain:
        monkeypatch.setattr(generation, "chain_serves", lambda *args: False)
    M, prompt, n = 4, 3, 3 + 12
    # the last layer's state as memory (no mix): seq_len 3, and seq_len 1 with batch 3
    model = random_model(W, M, cross_attend=cross, keep_last_hidden=W == 3 or b == 3, seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, VOCAB, (b, n), generator=g)
    kwargs = {}
    if cross:
        kwargs = dict(context=torch.randn(b, 5, DIM, generator=g, dtype=torch.float64))
    expected, expected_memory = paper(model, x, return_memory=True, **kwargs)
    with torch.no_grad():
        logits, state = model.prefill(x[:, :prompt], **kwargs)
        assert (state.chain is not None) == (chain and W == 1 and not cross)
        steps = [logits]
        for t in range(prompt, n):
            logits, state = model.step(x[:, t], state)
            steps.append(logits)
    assert_close("logits", torch.stack(steps[:-1], dim=1), expected[:, prompt - 1 : n - 1])
    assert_close("last logits", steps[-1], expected[:, -1])
    assert_close("memory keys", state.memory.keys, expected_memory.keys)
    assert_close("memory values", state.memory.values, expected_memory.values)


def test_full_windows_read_their_rows_and_first_projection_as_views(monkeypatch):
    """The full windows' rows are laid out window by window once per call: a window's input
    and its first layer's projection are views of those (one storage for all windows), not
    copies per window; the tail window (here 1 step) projects its own input (the windows
    layer by layer: the chains project each window in their call)."""
    monkeypatch.setattr(_inference_window, "chain_serves", lambda *args: False)
    model = random_model(2, 8)
    x = torch.randint(0, VOCAB, (2, 7))
    calls = []
    original = _inference_window.window

    def spy(weights, x, views, slots, bias, first_empty, cross, proj0=None, *args):
        storage = None if proj0 is None else proj0.untyped_storage().data_ptr()
        calls.append((x.untyped_storage().data_ptr(), storage, x.storage_offset()))
        return original(weights, x, views, slots, bias, first_empty, cross, proj0, *args)

    monkeypatch.setattr(_inference_window, "window", spy)
    with torch.no_grad():
        model(x)
    assert len(calls) == 4
    (rows, proj, _), *others, tail = calls
    assert proj is not None and rows != proj
    assert [call[:2] for call in others] == [(rows, proj)] * 2  # the same two storages
    assert [call[2] for call in calls[:3]] == [0, 4 * DIM, 8 * DIM]  # consecutive rows
    assert tail[1] is None and tail[0] != rows


@pytest.mark.parametrize(("W", "M"), [(1, 4), (2, 0), (3, 5), (8, 3)])
def test_window_biases_are_the_masked_window_bias(W, M):
    """`WindowBiases.get` (slices of one masked table) equals `window_bias` for every memory
    fill and window length."""
    table = torch.randn(2, W, M + W, dtype=torch.float64)
    biases = _inference_window.WindowBiases(table, W)
    for m in range(M + 1):
        for w in range(1, W + 1):
            bias, first_empty = biases.get(m, w)
            expected, expected_first_empty = window_bias(table, m, w, W)
            assert first_empty == expected_first_empty
            torch.testing.assert_close(bias, expected, rtol=0, atol=0)


def test_results_without_gradients_are_ordinary_tensors():
    """The windows run under ``torch.inference_mode``; the logits and memory of a call under
    ``torch.no_grad`` are ordinary tensors: a training call can continue from that memory
    and backpropagate."""
    model = random_model(2, 4).train()
    x = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        logits, memory = model(x, return_memory=True)
    assert not any(torch.is_inference(t) for t in (logits, memory.keys, memory.values))
    loss = model(x, memory=memory).sum() + (logits * 0).sum()
    loss.backward()
    assert model.token_emb.weight.grad is not None
