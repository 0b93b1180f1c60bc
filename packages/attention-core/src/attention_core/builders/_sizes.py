"""The size check of the transformer builders.

Refuse, before anything is allocated, a model whose parameters cannot exist (a tensor past torch's
storage limit, or more bytes than the machine's memory), naming the settings that make it so."""

from __future__ import annotations

import os

import torch

__all__ = ["check_parameter_sizes"]

# torch stores a tensor's size in bytes as a signed 64-bit integer
_STORAGE_LIMIT = 2**63 - 1


def _physical_memory() -> int | None:
    """Bytes of physical memory, or ``None`` where the platform does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def check_parameter_sizes(
    owner: str, settings: dict[str, int], tensor_sizes: list[int], copies: int
) -> None:
    """Raise ``ValueError`` if the parameters of ``tensor_sizes`` cannot be allocated.

    Counts ``copies`` times the element counts of ``tensor_sizes`` on the default device in the
    default dtype: one tensor past torch's storage limit, or, on the CPU, more bytes in all than the
    machine's physical memory.

    Arguments:
        owner: the builder's name, for the message.
        settings: the settings that determine the sizes, for the message.
        tensor_sizes: the element count of every parameter tensor of one layer.
        copies: the number of layers.
    """
    element = torch.empty((), dtype=torch.get_default_dtype()).element_size()
    device = torch.get_default_device()
    largest = max(tensor_sizes, default=0) * element
    total = sum(tensor_sizes) * copies * element
    described = ", ".join(f"{name}={value}" for name, value in settings.items())
    if largest > _STORAGE_LIMIT:
        raise ValueError(
            f"{owner} would allocate a parameter tensor of {largest} bytes for {described}; "
            f"torch's limit is {_STORAGE_LIMIT} bytes per tensor"
        )
    memory = _physical_memory() if device.type == "cpu" else None
    if memory is not None and total > memory:
        raise ValueError(
            f"{owner} would allocate {total} bytes ({total / 2**30:.3g} GiB) of "
            f"{torch.get_default_dtype()} parameters for {described}; this machine has "
            f"{memory / 2**30:.3g} GiB of memory"
        )
