"""Both paths of the model against the slow token-by-token oracle of ``_fb_reference.py`` in
float64: logits, the returned memory, and the gradients of every parameter, of the memory
passed in and of the memory returned. The fast path (``use_fast_path = True``, its custom
autograd functions) and the paper path (``feedback_transformer.reference``, plain autograd)
are checked alike, so the fast path equals the documented model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from feedback_transformer import FeedbackTransformer


def assert_close(name, actual, expected, **tolerances):
    """``torch.testing.assert_close`` (float64: rtol 1e-7, atol 1e-7) naming the quantity."""
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{name}: {m}", **tolerances)


_spec = importlib.util.spec_from_file_location(
    "feedback_transformer_tests_reference", Path(__file__).with_name("_fb_reference.py")
)
_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_reference)
reference_forward = _reference.reference_forward

DIM, HEADS, DIM_HEAD, VOCAB = 16, 3, 4, 11

# (seq_len, mem_len, n, keep_last_hidden, cross_attend, prefix length)
CASES = [
    pytest.param(1, 4, 7, False, False, 0, id="W1-M4-fifo"),
    pytest.param(2, 4, 7, False, False, 0, id="W2-M4-odd-tail"),
    pytest.param(3, 2, 8, True, False, 0, id="W3-M2-last-hidden"),
    pytest.param(2, 0, 5, False, False, 0, id="W2-M0-no-memory-odd-tail"),
    pytest.param(1, 8, 5, False, True, 0, id="W1-cross"),
    pytest.param(2, 3, 5, False, True, 2, id="W2-cross-prefix"),
    pytest.param(3, 10, 7, False, False, 4, id="W3-long-memory-prefix"),
    pytest.param(4, 3, 9, True, True, 5, id="W4-prefix-longer-than-mem_len"),
]


def random_model(seq_len, mem_len, keep_last_hidden=False, cross_attend=False, seed=0):
    """A float64 model whose parameters are all far from their (often zero) initial values."""
    torch.manual_seed(seed)
    model = FeedbackTransformer(
        num_tokens=VOCAB,
        dim=DIM,
        depth=2,
        seq_len=seq_len,
        mem_len=mem_len,
        dim_head=DIM_HEAD,
        heads=HEADS,
        keep_last_hidden=keep_last_hidden,
        cross_attend=cross_attend,
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "paper-path"])
@pytest.mark.parametrize(("W", "M", "n", "keep", "cross", "prefix_len"), CASES)
def test_matches_reference(W, M, n, keep, cross, prefix_len, fast):
    model = random_model(W, M, keep, cross)
    model.use_fast_path = fast
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (2, n), generator=g)
    context = mask = prefix = None
    if cross:
        context = torch.randn(2, 5, DIM, generator=g, dtype=torch.float64)
        mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    if prefix_len:
        prefix = tuple(
            torch.randn(
                2, HEADS, prefix_len, DIM_HEAD, generator=g, dtype=torch.float64
            ).requires_grad_()
            for _ in range(2)
        )
    logits, memory = model(
        x,
        memory=prefix,
        return_memory=True,
        context=context,
        context_mask=mask,
        detach_memory=False,
    )
    expected, ref_memory = reference_forward(model, x, prefix, context, mask)
    assert_close("logits", logits, expected)

    m = min(M, n + prefix_len)
    assert memory.keys.shape == (2, HEADS, m, DIM_HEAD)
    assert len(ref_memory) == m
    if m:
        assert_close("memory keys", memory.keys, torch.stack([k for _, k, _ in ref_memory], 2))
        assert_close("memory values", memory.values, torch.stack([v for _, _, v in ref_memory], 2))

    # one scalar that reaches every output: the logits and the returned memory
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (logits,)]
    mem_weights = torch.randn(2, HEADS, m, DIM_HEAD, generator=g, dtype=torch.float64)
    inputs = [p for p in model.parameters()] + (list(prefix) if prefix else [])

    def loss(out, keys, values):
        total = (out * weights[0]).sum()
        if m:
            total = total + (keys * mem_weights).sum() + (values * mem_weights.flip(-1)).sum()
        return total

    grads = torch.autograd.grad(loss(logits, *memory), inputs, allow_unused=True)
    ref_keys = torch.stack([k for _, k, _ in ref_memory], 2) if m else None
    ref_values = torch.stack([v for _, _, v in ref_memory], 2) if m else None
    ref_grads = torch.autograd.grad(loss(expected, ref_keys, ref_values), inputs, allow_unused=True)
    names = [name for name, _ in model.named_parameters()] + ["prefix keys", "prefix values"]
    for name, got, want in zip(names, grads, ref_grads):
        if want is None:  # a parameter the reference does not reach (e.g. the whole prefix)
            assert got is None or not got.any(), name
            continue
        assert got is not None, f"no gradient for {name}"
        assert_close(f"grad {name}", got, want)


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "paper-path"])
@pytest.mark.parametrize("W", [1, 3])
def test_gradients_with_dropout(W, fast):
    """The custom backward with attention and feed-forward dropout on: the gradient of a
    scalar loss along random directions of all parameters equals the central difference of
    the loss (the random masks are replayed by reseeding before every evaluation)."""
    model = random_model(W, 3).train()
    model.use_fast_path = fast
    model.layers[0].attn_dropout = model.layers[1].attn_dropout = 0.3
    for layer in model.layers:
        layer.ff.net[2].p = 0.2
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (2, 6), generator=g)
    weights = torch.randn(2, 6, VOCAB, generator=g, dtype=torch.float64)
    params = list(model.parameters())

    def loss():
        torch.manual_seed(123)
        return (model(x) * weights).sum()

    grads = torch.autograd.grad(loss(), params)
    eps = 1e-6
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(d, alpha=eps)
            up = loss()
            for p, d in zip(params, direction):
                p.sub_(d, alpha=2 * eps)
            down = loss()
            for p, d in zip(params, direction):
                p.add_(d, alpha=eps)
        numeric = (up - down) / (2 * eps)
        analytic = sum((gr * d).sum() for gr, d in zip(grads, direction))
        assert_close("directional derivative", analytic, numeric, rtol=1e-6, atol=1e-6)
    # the dropout really is on: two seeds give different outputs
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))


@pytest.mark.parametrize(("W", "M", "n", "keep", "cross", "prefix_len"), CASES)
def test_fast_path_equals_paper_path_in_inference(W, M, n, keep, cross, prefix_len):
    """Without gradients (the inference branch of the fast path) in float64."""
    model = random_model(W, M, keep, cross).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, VOCAB, (3, n), generator=g)
    kwargs = {}
    if cross:
        kwargs = dict(context=torch.randn(3, 4, DIM, generator=g, dtype=torch.float64))
    prefix = None
    if prefix_len:
        prefix = tuple(
            torch.randn(3, HEADS, prefix_len, DIM_HEAD, generator=g, dtype=torch.float64)
            for _ in range(2)
        )
    results = []
    with torch.no_grad():
        for fast in (True, False):
            model.use_fast_path = fast
            results.append(model(x, memory=prefix, return_memory=True, **kwargs))
    (fast_logits, fast_memory), (paper_logits, paper_memory) = results
    assert_close("logits", fast_logits, paper_logits)
    assert_close("memory keys", fast_memory.keys, paper_memory.keys)
    assert_close("memory values", fast_memory.values, paper_memory.values)
