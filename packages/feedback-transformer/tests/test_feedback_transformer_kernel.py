"""The compiled inference path (``feedback_transformer.kernel``, ``csrc/feedback.h``).

Every case runs the kernel in float32 and compares it with the module path of the same
weights in float64 (itself tested against the reference model): logits and the returned
memory, over shapes that leave partial panels (widths not multiples of 32), partial
windows, memory eviction, a prefix memory, keep_last_hidden, every instruction set and
1-3 threads. Then when the kernel is used and when the module path is, and that its packed
weights follow parameter updates.
"""

from __future__ import annotations

import copy

import pytest
import torch

from attention_core import _C
from attention_core.testing import assert_close
from feedback_transformer import FeedbackTransformer, kernel

CASES = {
    # name: (model options, batch, tokens, prefix memory steps)
    "seed_sizes": (dict(dim=64, depth=2, heads=4, dim_head=16, seq_len=2, mem_len=12), 2, 20, 0),
    "odd_widths": (
        dict(dim=37, depth=3, heads=3, dim_head=13, seq_len=3, mem_len=7, ff_mult=1.5), 3, 17, 0
    ),
    "paper_exact": (dict(dim=48, depth=2, heads=2, dim_head=24, seq_len=1, mem_len=5), 2, 9, 0),
    "no_memory": (dict(dim=40, depth=2, heads=2, dim_head=20, seq_len=4, mem_len=0), 2, 10, 0),
    "prefix_memory": (dict(dim=33, depth=1, heads=5, dim_head=7, seq_len=2, mem_len=6), 1, 11, 4),
    "last_hidden": (
        dict(dim=32, depth=2, heads=2, dim_head=16, seq_len=2, mem_len=8, keep_last_hidden=True),
        5, 13, 3,
    ),
    "short_input": (dict(dim=24, depth=2, heads=2, dim_head=12, seq_len=4, mem_len=8), 2, 3, 2),
    "cross_attention": (
        dict(dim=40, depth=2, heads=2, dim_head=20, seq_len=2, mem_len=6, cross_attend=True),
        3, 9, 2,
    ),
    "cross_attention_exact": (
        dict(dim=33, depth=2, heads=3, dim_head=11, seq_len=1, mem_len=4, cross_attend=True),
        2, 7, 0,
    ),
    "short_memory": (dict(dim=20, depth=2, heads=2, dim_head=10, seq_len=5, mem_len=2), 3, 13, 4),
    "long_window": (dict(dim=70, depth=2, heads=2, dim_head=40, seq_len=7, mem_len=100), 2, 30, 0),
}  # fmt: skip


def make_model(options: dict, seed: int = 0) -> FeedbackTransformer:
    torch.manual_seed(seed)
    model = FeedbackTransformer(num_tokens=29, **options).eval()
    with torch.no_grad():  # weights far from the initialisation: peaked attention, large mixes
        for p in model.parameters():
            p.normal_(0.0, 0.4)
    return model


def run_case(name: str, threads: int = 2):
    options, batch, n, prefix = CASES[name]
    model = make_model(options)
    context = context_mask = None
    if options.get("cross_attend"):
        generator = torch.Generator().manual_seed(6)
        context = torch.randn(batch, 5, options["dim"], generator=generator)
        context_mask = torch.rand(batch, 5, generator=generator) > 0.4
        context_mask[0] = False  # a row that sees no context position
        context_mask[-1, 2] = True
    reference = copy.deepcopy(model).double()
    reference.use_kernel = False
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, 29, (batch, n), generator=generator)
    memory = None
    if prefix:
        with torch.no_grad():
            start = torch.randint(0, 29, (batch, prefix), generator=generator)
            _, memory = reference(
                start,
                return_memory=True,
                **contexts(reference, context, context_mask, torch.float64),
            )
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            memory32 = None if memory is None else memory.__class__(*(t.float() for t in memory))
            assert kernel.available(model, model.token_emb(x))
            logits, new_memory = model(
                x,
                memory32,
                return_memory=True,
                **contexts(model, context, context_mask, torch.float32),
            )
            expected, expected_memory = reference(
                x,
                memory,
                return_memory=True,
                **contexts(reference, context, context_mask, torch.float64),
            )
    finally:
        torch.set_num_threads(previous)
    return (logits, new_memory), (expected, expected_memory)


def contexts(model, context, mask, dtype) -> dict:
    if not model.cross_attend:
        return {}
    return dict(context=context.to(dtype), context_mask=mask)


def assert_matches(actual, expected):
    (logits, memory), (want, want_memory) = actual, expected
    assert_close("logits", logits, want, rtol=1e-4, atol=1e-4)
    assert_close("memory keys", memory.keys, want_memory.keys, rtol=1e-4, atol=1e-4)
    assert_close("memory values", memory.values, want_memory.values, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_matches_the_module_path_in_float64(name):
    assert_matches(*run_case(name))


@pytest.mark.parametrize("level", [0, 1, 2])
@pytest.mark.parametrize("team", [1, 3])
def test_every_instruction_set_and_team_size_gives_the_same_model(level, team, monkeypatch):
    # small models: the kernel would pick one thread; the team size is forced
    monkeypatch.setattr(kernel, "TEAM", team)
    _C.set_cpu_level(level)  # capped at what this CPU supports
    try:
        for name in ("odd_widths", "prefix_memory", "cross_attention", "short_memory"):
            assert_matches(*run_case(name, threads=team))
    finally:
        _C.set_cpu_level(-1)


def test_the_kernel_runs_without_gradients_and_the_module_path_with_them(monkeypatch):
    model = make_model(CASES["seed_sizes"][0])
    x = torch.randint(0, 29, (2, 9), generator=torch.Generator().manual_seed(2))
    calls = []

    def spy(*args):
        calls.append(args[0])  # the sizes
        return _C.feedback_forward_f32(*args)

    monkeypatch.setattr(kernel, "_forward", spy)
    with torch.no_grad():
        fast = model(x)
    assert len(calls) == 1
    slow = model(x)  # gradients recorded: the module path
    assert len(calls) == 1 and slow.requires_grad
    assert_close("kernel vs module path", fast, slow.detach(), rtol=1e-4, atol=1e-4)


def test_the_module_path_serves_what_the_kernel_does_not():
    options = CASES["seed_sizes"][0]
    model = make_model(options)
    h = model.token_emb(torch.zeros(2, 3, dtype=torch.long)).detach()
    with torch.no_grad():
        assert kernel.available(model, h)
        assert not kernel.available(model, h.double())  # float32 only
        assert not kernel.available(model, h[:0])  # empty batch
        model.use_kernel = False
        assert not kernel.available(model, h)
        model.use_kernel = True
        for module in (model.layers[1], model.layers[0].ff_norm):
            handle = module.register_forward_hook(lambda *args: None)
            assert not kernel.available(model, h)  # hooks must fire
            handle.remove()
        edited = make_model(options)
        edited.layers[1].ff_norm.eps = 1e-3  # the kernel takes one epsilon per kind of norm
        assert not kernel.available(edited, h)
        dropout = make_model({**options, "attn_dropout": 0.1})
        assert kernel.available(dropout, h)  # eval: no dropout in effect
        assert not kernel.available(dropout.train(), h)
        mixed = make_model(options)
        mixed.layers[1].ff.double()  # the module path raises its dtype error
        assert not kernel.available(mixed, h)
    assert not kernel.available(model, h)  # gradients recorded


def test_a_fully_masked_context_row_gives_zeros_even_with_non_finite_context():
    options = CASES["cross_attention"][0]
    model = make_model(options)
    x = torch.randint(0, 29, (2, 5), generator=torch.Generator().manual_seed(7))
    context = torch.randn(2, 4, options["dim"], generator=torch.Generator().manual_seed(8))
    context[0, 1] = float("inf")
    mask = torch.tensor([[False] * 4, [True, False, True, True]])
    with torch.no_grad():
        logits = model(x, context=context, context_mask=mask)
        model.use_kernel = False
        expected = model(x, context=context, context_mask=mask)
    assert torch.isfinite(logits).all()
    assert_close("kernel vs module path", logits, expected, rtol=1e-4, atol=1e-4)


def test_tracing_records_the_module_path(monkeypatch):
    model = make_model(CASES["seed_sizes"][0])
    h = model.token_emb(torch.zeros(2, 3, dtype=torch.long)).detach()
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    with torch.no_grad():
        assert not kernel.available(model, h)


@pytest.mark.parametrize("update", ["in_place", "data", "fused_adamw"])
def test_the_kernel_reads_the_weights_as_they_are_at_each_call(update):
    # version counters are not enough: .data writes and fused optimizers do not move them
    model = make_model(CASES["odd_widths"][0])
    x = torch.randint(0, 29, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(x)
    if update == "fused_adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
        model.use_kernel = False  # gradients are recorded anyway
        model(x).square().mean().backward()
        model.use_kernel = True
        optimizer.step()
    else:
        with torch.no_grad():
            weight = model.layers[1].ff_parts()[0].weight
            (weight.data if update == "data" else weight).mul_(1.5)
            model.to_kv.weight.data.add_(0.1)
    with torch.no_grad():
        after = model(x)
        model.use_kernel = False
        expected = model(x)
    assert (after - before).abs().max() > 1e-2
    assert_close("after the update", after, expected, rtol=1e-4, atol=1e-4)


def test_prefill_takes_the_kernel_and_matches_token_by_token_steps():
    model = make_model(CASES["paper_exact"][0])
    prompt = torch.randint(0, 29, (2, 12), generator=torch.Generator().manual_seed(4))
    logits, state = model.prefill(prompt)
    model.use_kernel = False
    expected, expected_state = model.prefill(prompt)
    assert_close("prefill logits", logits, expected, rtol=1e-4, atol=1e-4)
    assert_close(
        "prefill memory", state.memory.keys, expected_state.memory.keys, rtol=1e-4, atol=1e-4
    )
