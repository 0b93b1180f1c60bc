"""Input validation of the recurrent modules.

One element per step, ``(N, ...)`` without a sequence axis, and whole prompts ``(N, T, ...)`` for
``prefill``."""

from __future__ import annotations

import contextvars

import torch

from attention_core.checks import check_tensor

__all__ = [
    "check_element",
    "check_finite",
    "check_heads",
    "check_output",
    "check_prompt",
    "check_sequence_heads",
    "end_layer_checks",
    "start_layer_checks",
]

# set while a model runs its layers on an input it has checked: the layers then skip their own
# finiteness checks, and the model checks its output once instead
_MODEL_CHECKED = contextvars.ContextVar("recurrent_transformer_model_checked", default=False)


def start_layer_checks() -> contextvars.Token | None:
    """Skip the layers' finiteness checks until `end_layer_checks`.

    Called by a model after it has checked its input, before it runs its layers (the model checks
    its output with `check_output`). Returns the token for `end_layer_checks` (``None`` under
    ``torch.compile``, where nothing is checked)."""
    if torch.compiler.is_compiling():
        return None
    return _MODEL_CHECKED.set(True)


def end_layer_checks(token: contextvars.Token | None) -> None:
    """Undo `start_layer_checks`."""
    if token is not None:
        _MODEL_CHECKED.reset(token)


def _non_finite(x) -> bool:
    """Whether a CPU tensor holds NaN or infinity.

    ``False`` off the CPU (it would cost a device synchronisation per step), under ``torch.compile``
    and for empty tensors."""
    if x.device.type != "cpu" or torch.compiler.is_compiling() or not x.numel():
        return False
    return not bool(torch.isfinite(x).all())


def check_output(x, owner: str) -> None:
    """Refuse a model output that turned non-finite inside the layers from a finite input.

    Such an output comes from an overflow: the new state, which absorbed it, is never returned, and
    the previous state stays valid. CPU tensors outside ``torch.compile``, like `check_finite`."""
    if _non_finite(x):
        raise ValueError(
            f"{owner} produced NaN or infinite values from a finite input (an overflow inside "
            "a layer?); the new state is discarded: continue from the previous one"
        )


def check_finite(name: str, x) -> None:
    """Reject NaN and infinite inputs before a recurrent state absorbs them.

    A poisoned state returns non-finite outputs for the rest of the stream. Checked for CPU tensors
    outside ``torch.compile``; on CUDA it would cost a device synchronisation per step. Skipped
    inside a model's layers when the model has checked its input (see `start_layer_checks`)."""
    if torch.compiler.is_compiling() or _MODEL_CHECKED.get():
        return
    if _non_finite(x):
        raise ValueError(
            f"{name} holds NaN or infinite values; the recurrent state would absorb them "
            "and every later output would be non-finite"
        )


def check_element(name: str, x, features: int, owner: str) -> tuple[int, int]:
    """Check one element of a sequence, ``(N, features)``.

    A whole sequence ``(N, L, E)`` gets a message pointing to ``prefill``.

    Returns:
        ``(N, features)``.
    """
    check_tensor(name, x, floating=True)
    if x.dim() == 3 and x.shape[-1] == features:
        raise ValueError(
            f"{owner} takes one element of the sequence per call: {name} must have shape "
            f"(N, {features}); got a whole sequence {tuple(x.shape)} (step through it, or use "
            f"{owner}.prefill for a prompt)"
        )
    if x.dim() != 2 or x.shape[1] != features:
        raise ValueError(f"{name} must have shape (N, {features}); got {tuple(x.shape)}")
    check_finite(name, x)
    return x.shape[0], x.shape[1]


def check_prompt(name: str, x, features: int) -> tuple[int, int]:
    """Check a whole sequence ``(N, T, features)`` with ``T >= 1``.

    Returns:
        ``(N, T)``.
    """
    check_tensor(name, x, floating=True)
    if x.dim() != 3 or x.shape[2] != features or x.shape[1] < 1:
        raise ValueError(
            f"{name} must have shape (N, T, {features}) with T >= 1; got {tuple(x.shape)}"
        )
    check_finite(name, x)
    return x.shape[0], x.shape[1]


def check_heads(query, key, value, *, same_dims: bool = False) -> tuple[int, int, int, int]:
    """Check the per-step inputs of an inner recurrent attention.

    Query and key ``(N, H, E)``, value ``(N, H, D)``, one dtype and device.

    Returns:
        ``(N, H, E, D)``.
    """
    check_tensor("query", query, dim=3, floating=True)
    check_tensor("key", key, dim=3, floating=True, dtype=query.dtype, device=query.device)
    check_tensor("value", value, dim=3, floating=True, dtype=query.dtype, device=query.device)
    N, H, E = query.shape
    if key.shape != query.shape:
        raise ValueError(
            f"key must have the shape of query (N, H, E) = {tuple(query.shape)}; "
            f"got {tuple(key.shape)}"
        )
    if value.shape[:2] != (N, H):
        raise ValueError(f"value must have shape ({N}, {H}, D); got {tuple(value.shape)}")
    D = value.shape[2]
    if same_dims and D != E:
        raise ValueError(
            f"this attention needs queries and values with the same head dimension; got {E} and {D}"
        )
    return N, H, E, D


def check_sequence_heads(
    queries, keys, values, *, same_dims: bool = False
) -> tuple[int, int, int, int, int]:
    """Check the inputs of an inner recurrent attention's ``prefill``.

    Queries and keys ``(N, T, H, E)``, values ``(N, T, H, D)``.

    Returns:
        ``(N, T, H, E, D)``.
    """
    check_tensor("queries", queries, dim=4, floating=True)
    check_tensor("keys", keys, dim=4, floating=True, dtype=queries.dtype, device=queries.device)
    check_tensor("values", values, dim=4, floating=True, dtype=queries.dtype, device=queries.device)
    N, T, H, E = queries.shape
    if keys.shape != queries.shape:
        raise ValueError(
            f"keys must have the shape of queries (N, T, H, E) = {tuple(queries.shape)}; "
            f"got {tuple(keys.shape)}"
        )
    if values.shape[:3] != (N, T, H):
        raise ValueError(f"values must have shape ({N}, {T}, {H}, D); got {tuple(values.shape)}")
    D = values.shape[3]
    if same_dims and D != E:
        raise ValueError(
            f"this attention needs queries and values with the same head dimension; got {E} and {D}"
        )
    return N, T, H, E, D
