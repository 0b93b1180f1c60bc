"""Autoregressive decoding over a two-method step protocol that every model family implements.

The families: full recomputation, recurrent state, Transformer-XL memories, ...

A model exposes ``prefill(tokens) -> (logits, state)``, which consumes the whole prompt and
returns the logits of its last position, and ``step(token, state) -> (logits, state)``, which
consumes one new token per row. `stream` yields new tokens one at a time and
`generate` returns the prompt followed by them.

Einstein notation: ``b`` batch, ``t`` prompt length, ``v`` vocabulary, ``n`` new tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .._checks import check_positive_int, check_tensor
from .sampling import _check_temperature, _check_top_p, sample

__all__ = ["StepModel", "generate", "stream"]


@runtime_checkable
class StepModel(Protocol):
    """What `stream` and `generate` need from a model.

    ``state`` is opaque to the decoding loop: whatever ``prefill`` returns is passed to the
    first ``step``, whatever a ``step`` returns is passed to the next one.
    """

    def prefill(self, tokens: Tensor) -> tuple[Tensor, Any]:
        """Consume the prompt ``tokens`` ``(B, T)`` int64 (``T >= 1``).

        Returns:
            the logits ``(B, V)`` of the last prompt position and the state.
        """
        ...

    def step(self, tokens: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Consume one token per row, ``tokens`` ``(B,)`` int64, after ``state``.

        Returns:
            the logits ``(B, V)`` for the next position and the updated state.
        """
        ...


def _check_logits(method: str, logits, batch: int) -> Tensor:
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"model.{method} must return (logits, state) with logits a torch.Tensor; "
            f"got {type(logits).__name__}"
        )
    if logits.dim() != 2 or logits.shape[0] != batch or not logits.is_floating_point():
        raise ValueError(
            f"model.{method} must return floating logits of shape (B, V) with B = {batch}; "
            f"got shape {tuple(logits.shape)} and dtype {logits.dtype}"
        )
    return logits


def _unpack(method: str, out) -> tuple[Tensor, Any]:
    if not isinstance(out, tuple) or len(out) != 2:
        raise TypeError(f"model.{method} must return a (logits, state) tuple; got {out!r:.80}")
    return out


def stream(
    model: StepModel,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """Yield up to ``max_new_tokens`` new tokens, each of shape ``(B,)`` int64.

    The arguments are validated when ``stream`` is called; the model runs lazily as the
    iterator is consumed, under ``torch.no_grad()`` (the caller's code between items is
    not affected). ``model.prefill`` runs once and ``model.step`` once per yielded token
    except the last.

    With ``eos_token``, a row that has produced it keeps yielding ``eos_token`` (rows stay
    aligned), and the iteration stops right after the step in which every row has produced
    it. Occurrences in the prompt do not count.

    Arguments:
        model: a `StepModel`.
        prompt: ``(B, T)`` int64 with ``T >= 1``.
        max_new_tokens: ``>= 0``.
        temperature: ``>= 0``; ``0`` is greedy decoding.
        top_k: sample among the ``top_k`` (``>= 1``) most likely tokens, or ``None``.
        top_p: nucleus mass in ``(0, 1]``, or ``None``.
        eos_token: end-of-sequence id, or ``None``.
        generator: random generator on the device of the logits, for reproducible draws.

    Example:
        >>> class Bigram:
        ...     def __init__(self, table):
        ...         self.table = table
        ...     def prefill(self, tokens):
        ...         return self.table[tokens[:, -1]], None
        ...     def step(self, tokens, state):
        ...         return self.table[tokens], state
        >>> model = Bigram(torch.eye(4).roll(1, dims=1))   # i -> i + 1 (mod 4)
        >>> tokens = stream(model, torch.tensor([[0], [2]]), 3, temperature=0)
        >>> [t.tolist() for t in tokens]
        [[1, 3], [2, 0], [3, 1]]
    """
    _check_prompt(prompt)
    check_positive_int("max_new_tokens", max_new_tokens, allow_zero=True)
    _check_temperature(temperature)
    if top_k is not None:
        check_positive_int("top_k", top_k)
    if top_p is not None:
        _check_top_p(top_p)
    if eos_token is not None and (not isinstance(eos_token, int) or isinstance(eos_token, bool)):
        raise TypeError(f"eos_token must be an int or None; got {type(eos_token).__name__}")
    for method in ("prefill", "step"):
        if not callable(getattr(model, method, None)):
            raise TypeError(
                f"model must implement the StepModel protocol; {type(model).__name__} has no "
                f"{method}() method"
            )
    return _stream(model, prompt, max_new_tokens, temperature, top_k, top_p, eos_token, generator)


@torch.no_grad()
def _stream(model, prompt, max_new_tokens, temperature, top_k, top_p, eos_token, generator):
    if max_new_tokens == 0:
        return
    batch = prompt.shape[0]
    logits, state = _unpack("prefill", model.prefill(prompt))
    finished = None
    for n in range(max_new_tokens):
        logits = _check_logits("prefill" if n == 0 else "step", logits, batch)
        tokens = sample(logits, temperature, top_k, top_p, generator)
        if eos_token is not None:
            if finished is None:
                finished = torch.zeros_like(tokens, dtype=torch.bool)
            tokens = tokens.masked_fill(finished, eos_token)
            finished = finished | (tokens == eos_token)
        yield tokens
        if n + 1 == max_new_tokens or (finished is not None and bool(finished.all())):
            return
        logits, state = _unpack("step", model.step(tokens, state))


def generate(
    model: StepModel,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The prompt followed by the tokens of `stream` (same arguments).

    Returns:
        ``(B, T + n)`` int64 with ``n <= max_new_tokens`` (``n`` is smaller only when every
        row produced ``eos_token``).

    Example:
        >>> class Bigram:
        ...     def __init__(self, table):
        ...         self.table = table
        ...     def prefill(self, tokens):
        ...         return self.table[tokens[:, -1]], None
        ...     def step(self, tokens, state):
        ...         return self.table[tokens], state
        >>> model = Bigram(torch.eye(4).roll(1, dims=1))   # i -> i + 1 (mod 4)
        >>> generate(model, torch.tensor([[0, 1]]), 4, temperature=0)
        tensor([[0, 1, 2, 3, 0, 1]])
        >>> generate(model, torch.tensor([[0, 1]]), 4, temperature=0, eos_token=3)
        tensor([[0, 1, 2, 3]])
    """
    new = list(
        stream(
            model,
            prompt,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token=eos_token,
            generator=generator,
        )
    )
    if not new:
        return prompt.clone()
    return torch.cat([prompt, torch.stack(new, dim=1).to(prompt.device)], dim=1)


def _check_prompt(prompt) -> None:
    check_tensor("prompt", prompt, dim=2, dtype=torch.int64)
    if prompt.shape[1] < 1:
        raise ValueError(f"prompt must have shape (B, T) with T >= 1; got {tuple(prompt.shape)}")
