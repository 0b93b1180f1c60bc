"""The training path's written-out backward (``_fused_window_step.LayerStep``) and the memory
gradients that a window's layers add in one pass (``_kv_store.KVStore.accumulate_products``).

Gradients are compared in float64 with the composed ops of the same layer
(``_window_loop.FUSED = False``), which the reference tests check against the paper path
and a slow token-by-token model.
"""

from __future__ import annotations

import pytest
import torch

from attention_core.testing import assert_close
from feedback_transformer import FeedbackTransformer, _window_loop

OPTIONS = {
    "windows": dict(seq_len=2, mem_len=6),
    "paper_exact": dict(seq_len=1, mem_len=5),
    "no_memory": dict(seq_len=3, mem_len=0),
    "short_memory": dict(seq_len=4, mem_len=3),
    "last_hidden": dict(seq_len=2, mem_len=4, keep_last_hidden=True),
}


def make_model(options: dict) -> FeedbackTransformer:
    torch.manual_seed(0)
    model = FeedbackTransformer(num_tokens=23, dim=24, depth=3, heads=2, dim_head=8, **options)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.double()


def gradients(model, tokens, layer_step: bool, frozen=()) -> dict[str, torch.Tensor | None]:
    """Gradients of a loss over two chained calls (the second one's memory keeps the graph)."""
    model.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    previous = _window_loop.FUSED
    _window_loop.FUSED = layer_step
    try:
        _, memory = model(tokens[:, :3], return_memory=True, detach_memory=False)
        (model(tokens[:, 3:], memory=memory) ** 2).mean().backward()
    finally:
        _window_loop.FUSED = previous
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_layer_step_gradients_equal_the_composed_ops(name):
    model = make_model(OPTIONS[name])
    tokens = torch.randint(0, 23, (2, 11), generator=torch.Generator().manual_seed(1))
    fused, composed = gradients(model, tokens, True), gradients(model, tokens, False)
    assert fused.keys() == composed.keys()
    for key in fused:
        assert (fused[key] is None) == (composed[key] is None), key
        if fused[key] is not None:
            assert_close(key, fused[key], composed[key], rtol=1e-10, atol=1e-12)


def test_frozen_parameters_get_no_gradient_and_the_others_are_unchanged():
    model = make_model(OPTIONS["windows"])
    tokens = torch.randint(0, 23, (2, 11), generator=torch.Generator().manual_seed(2))
    frozen = {
        "attn_norm.weight",
        "layers.1.to_out.weight",
        "layers.0.ff.net.0.bias",
        "to_kv.weight",
    }
    fused = gradients(model, tokens, True, frozen)
    composed = gradients(model, tokens, False, frozen)
    for key in fused:
        if key in frozen:
            assert fused[key] is None and composed[key] is None, key
        else:
            assert_close(key, fused[key], composed[key], rtol=1e-10, atol=1e-12)


def test_a_single_step_without_memory_leaves_the_query_path_without_gradient():
    # the first step of a seq_len=1 model sees nothing: its attention output is zero
    model = make_model(OPTIONS["paper_exact"])
    model(torch.tensor([[3], [5]])).square().mean().backward()
    assert all(layer.to_q.weight.grad is None for layer in model.layers)
    assert model.layers[0].to_out.bias.grad.abs().sum() > 0


def test_memory_gradients_add_up_over_retained_graphs():
    # the products held back by accumulate_products are added exactly once per backward pass
    model = make_model(OPTIONS["windows"])
    tokens = torch.randint(0, 23, (2, 11), generator=torch.Generator().manual_seed(3))
    _, memory = model(tokens[:, :4], return_memory=True, detach_memory=False)
    loss = (model(tokens[:, 4:], memory=memory) ** 2).mean()
    loss.backward(retain_graph=True)
    once = {name: p.grad.clone() for name, p in model.named_parameters()}
    loss.backward()
    for name, p in model.named_parameters():
        assert_close(name, p.grad, 2 * once[name], rtol=1e-12, atol=1e-14)


def test_dropout_gradients_match_finite_differences():
    # with the random masks fixed by reseeding, the loss is a smooth function of the weights
    model = make_model({**OPTIONS["windows"], "attn_dropout": 0.2, "ff_dropout": 0.3}).train()
    tokens = torch.randint(0, 23, (2, 9), generator=torch.Generator().manual_seed(4))

    def loss() -> torch.Tensor:
        torch.manual_seed(5)
        return (model(tokens) ** 2).mean()

    loss().backward()
    direction = [torch.randn_like(p) for p in model.parameters()]
    slope = sum((p.grad * v).sum() for p, v in zip(model.parameters(), direction))
    eps = 1e-6
    with torch.no_grad():
        for p, v in zip(model.parameters(), direction):
            p.add_(eps * v)
        up = loss()
        for p, v in zip(model.parameters(), direction):
            p.sub_(2 * eps * v)
        down = loss()
    assert_close("directional derivative", slope, (up - down) / (2 * eps), rtol=1e-6, atol=1e-9)
