"""Helpers shared by the test suites of every package.

Shipped so that the model packages' tests can use them without a root conftest."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TOLERANCES", "assert_close", "random_lengths", "seeded"]

# (rtol, atol) by dtype; comparisons against float64 references use the float64 row.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}


def assert_close(name: str, actual: Tensor, expected: Tensor, *, rtol=None, atol=None) -> None:
    """``torch.testing.assert_close`` with dtype-based tolerances and a message naming the values.

    The message names the compared quantity (e.g. ``"dq"``) and the largest difference."""
    default_rtol, default_atol = TOLERANCES.get(actual.dtype, (1e-5, 1e-8))
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    expected = expected.to(actual.dtype)
    if actual.shape != expected.shape:
        raise AssertionError(
            f"{name}: shape {tuple(actual.shape)} differs from expected {tuple(expected.shape)}"
        )

    def message(default: str) -> str:
        diff = (actual.detach().double() - expected.detach().double()).abs()
        worst = diff.max().item() if diff.numel() else 0.0
        return f"{name}: max abs diff {worst:.3e} (rtol={rtol}, atol={atol})\n{default}"

    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=message)


def random_lengths(N: int, L: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Random lengths in ``[1, L]`` of shape ``(N,)``, the first one always ``L``."""
    lengths = torch.randint(1, L + 1, (N,), generator=generator)
    if N:
        lengths[0] = L
    return lengths


def seeded(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)
