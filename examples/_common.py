"""What the example tasks share: a training loop over generated batches and a Markdown table."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn


def train(
    model: nn.Module,
    loss_of: Callable[[nn.Module, Tensor, Tensor], Tensor],
    batches: Callable[[torch.Generator], tuple[Tensor, Tensor]],
    steps: int,
    lr: float,
    seed: int = 0,
) -> dict[str, float]:
    """Train ``model`` for ``steps`` AdamW steps on ``batches(generator) -> (inputs, targets)``.

    Returns the last loss and the median milliseconds per step.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=max(steps, 1))
    times, loss = [], torch.tensor(float("nan"))
    model.train()
    for _ in range(steps):
        inputs, targets = batches(generator)
        start = time.perf_counter()
        loss = loss_of(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"loss": loss.item(), "ms_per_step": 1000 * times[len(times) // 2] if times else 0.0}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(path: str | None, title: str, command: str, table: str) -> None:
    """Print the table and, if ``path``, write it as a Markdown snippet for the docs."""
    text = f"{title}\n\n{table}\n\nCommand: `{command}`\n"
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
