"""Printing the demo's sample: a prompt that starts at a line boundary, a visible marker where
the model takes over, and bytes decoded incrementally as UTF-8 (a character split over several
sampled bytes is printed once complete, not as replacement characters)."""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

MARKER = "\u2588"  # a full block between the prompt and the continuation
ASCII_MARKER = "|>"


def prompt_at_line_start(tokens: Tensor, length: int, generator: torch.Generator) -> Tensor:
    """``(1, length')`` bytes of ``tokens`` starting at a random line start (after a ``\\n``),
    or a word start when no line starts in reach, with ``length' <= length``.

    Arguments:
        tokens: ``(n,)`` bytes (int64).
        length: the most bytes to take.
        generator: draws the place (a fixed seed gives the same prompt every run).
    """
    n = len(tokens)
    if n < 2:
        raise ValueError(f"tokens must hold at least 2 bytes; got {n}")
    length = max(1, min(length, n - 1))
    start = int(torch.randint(0, max(1, n - 2 * length), (1,), generator=generator))
    window = tokens[start : start + 2 * length].tolist()
    for boundary in (b"\n", b" \t"):
        offset = next((i + 1 for i, b in enumerate(window[:length]) if b in boundary), None)
        if offset is not None:
            start += offset
            break
    return tokens[start : start + length][None]


def decode_stream(byte_values: Iterable[int]) -> Iterator[str]:
    """Decode a stream of byte values incrementally as UTF-8: yields each piece of text as
    soon as its bytes are complete (invalid sequences become U+FFFD, as ``errors="replace"``)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for value in byte_values:
        text = decoder.decode(bytes([value]))
        if text:
            yield text
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def marker_for(encoding: str | None) -> str:
    """The continuation marker, or an ASCII one where the output cannot encode it."""
    try:
        MARKER.encode(encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return ASCII_MARKER
    return MARKER
