"""RecurrentLM's default position scheme (a token shift, no absolute positions) lets a trained
model read past its training window: on a small character-level model trained on the Python
standard library's sources, bits per character at positions 1x-3x the training window stay
within 10% of those inside it, inside the window it is no worse than the former default
(sinusoidal absolute positions), and that former default does degrade (so the test can
fail)."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from recurrent_transformer.lm import RecurrentLM

WINDOW, STEPS, BATCH = 32, 500, 16


def corpus(max_bytes: int = 600_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out bytes of the standard library's ``*.py`` files."""
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    data = b"".join(p.read_bytes() for p in paths[:60])[:max_bytes]
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    split = int(0.9 * len(tokens))
    return tokens[:split], tokens[split:]


def windows(tokens, count, length, generator):
    starts = torch.randint(0, len(tokens) - length - 1, (count,), generator=generator)
    return torch.stack([tokens[s : s + length + 1] for s in starts.tolist()])


def trained(positional_encoding: str, train: torch.Tensor) -> RecurrentLM:
    torch.manual_seed(0)
    model = RecurrentLM(256, n_layers=2, n_heads=2, query_dimensions=32, value_dimensions=32,
                        positional_encoding=positional_encoding)  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * (1 - 0.9 * step / STEPS)
        seq = windows(train, BATCH, WINDOW, generator)
        loss = F.cross_entropy(model(seq[:, :-1]).transpose(1, 2), seq[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return model.eval()


def bits_by_window(model: RecurrentLM, held_out: torch.Tensor) -> list[float]:
    """Bits per character at positions [0, W), [W, 2W), [2W, 3W) over 64 random windows."""
    seq = windows(held_out, 64, 3 * WINDOW, torch.Generator().manual_seed(1))
    with torch.no_grad():
        nats = F.cross_entropy(model(seq[:, :-1]).transpose(1, 2), seq[:, 1:], reduction="none")
    bits = nats / math.log(2)
    return [bits[:, i * WINDOW : (i + 1) * WINDOW].mean().item() for i in range(3)]


@pytest.mark.slow
def test_the_default_reads_past_its_training_window_without_losing_quality_inside_it():
    torch.set_num_threads(1)  # small ops: one thread is fastest, and steady on a shared machine
    train, held_out = corpus()
    default = bits_by_window(trained("token-shift", train), held_out)
    former = bits_by_window(trained("sinusoidal", train), held_out)
    inside, second, third = default
    assert inside < 3.3, f"the small model did not learn: {default}"
    assert second <= 1.1 * inside and third <= 1.1 * inside, f"token shift: {default}"
    assert inside <= former[0] + 0.05, f"token shift {default} vs sinusoidal {former}"
    assert former[2] > 1.1 * former[0], f"sinusoidal positions should degrade: {former}"
    assert RecurrentLM(256).positional_encoding == "token-shift"
