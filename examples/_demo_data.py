"""The demo's corpus: bytes of a text file (or of the standard library's sources), its identity
for checkpoints, random training windows and the validation estimate in bits per character."""

from __future__ import annotations

import hashlib
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: validation windows drawn for the printed estimate (with a generator of their own, seeded
#: with VALIDATION_SEED, so that every run and every model family is measured on the same text)
VALIDATION_WINDOWS = 64
VALIDATION_SEED = 1234


@dataclass
class Corpus:
    """Training and validation bytes ``(n,)`` int64 (95% / 5%) and where they came from.

    Attributes:
        name: a short name for file names: ``"stdlib"`` or the data file's stem.
        identity: what a checkpoint must match: source, size and SHA-256 of the bytes used.
    """

    train: Tensor
    valid: Tensor
    name: str
    identity: dict


def stdlib_corpus(max_bytes: int) -> bytes:
    """Up to ``max_bytes`` of the standard library's ``*.py`` files, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise SystemExit(f"no *.py files under {root}; pass --data PATH")
    return b"".join(chunks)[:max_bytes]


def load_corpus(path: str | None, max_bytes: int) -> Corpus:
    """Read ``path`` (default: the stdlib sources), at most ``max_bytes``, and split it."""
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise SystemExit(f"--data: no such file: {path}")
        data = file.read_bytes()[:max_bytes]
        name, source = file.stem or "data", str(file.resolve())
    else:
        data, name, source = stdlib_corpus(max_bytes), "stdlib", "python-stdlib"
    if len(data) < 4096:
        raise SystemExit(f"the corpus has {len(data)} bytes; need at least 4096")
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    split = int(len(tokens) * 0.95)
    identity = {"source": source, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return Corpus(tokens[:split], tokens[split:], name, identity)


def random_windows(tokens: Tensor, batch: int, length: int, generator: torch.Generator) -> Tensor:
    """``(batch, length + 1)`` windows at random offsets of ``tokens``."""
    starts = torch.randint(0, len(tokens) - length - 1, (batch,), generator=generator)
    return torch.stack([tokens[s : s + length + 1] for s in starts.tolist()])


def bits_per_character(
    logits_of, model: nn.Module, tokens: Tensor, window: int, windows: int = VALIDATION_WINDOWS
) -> float:
    """Mean cross entropy in bits per byte over ``windows`` random windows of ``tokens``.

    Arguments:
        logits_of: ``(model, inputs (B, T)) -> logits (B, T, V)``.
        model: the model, evaluated without gradients in eval mode (then put back in its mode).
        tokens: ``(n,)`` validation bytes.
        window: the length of each window.
        windows: how many windows (drawn with the fixed ``VALIDATION_SEED``).
    """
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    seqs = random_windows(tokens, windows, window, generator)
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for batch in seqs.split(16):
            logits = logits_of(model, batch[:, :-1])
            total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
    model.train(was_training)
    return float(total) / seqs[:, 1:].numel() / math.log(2)
