"""Masks that tell an attention which queries may look at which keys.

Every attention module receives three masks: ``attn_mask`` (which keys each query may
attend to, shape ``(L, S)``), ``query_lengths`` and ``key_lengths`` (how many positions of
each padded sequence in the batch are real, shapes ``(N, L)`` and ``(N, S)``).

A mask exposes the same information in the forms different attentions need: a boolean
matrix (``True`` = may attend), a float matrix of ones and zeros, an additive matrix of
``0`` and ``-inf`` (or a large negative finite number), and, when the mask has that form,
the per-row lengths.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BaseMask", "FullMask", "LengthMask", "TriangularCausalMask", "zero_padding"]


class BaseMask:
    """Interface of all masks; subclasses provide ``bool_matrix`` and ``shape``.

    Derived representations are computed once and cached.
    """

    @property
    def bool_matrix(self) -> Tensor:
        """Boolean tensor of shape `shape`; ``True`` where attention is allowed."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the mask, e.g. ``(L, S)`` or ``(N, L)``."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """The device of `bool_matrix` (known without building it for length masks)."""
        return self.bool_matrix.device

    @property
    def float_matrix(self) -> Tensor:
        """``bool_matrix`` as float32 ones and zeros."""
        if not hasattr(self, "_float_matrix"):
            self._float_matrix = self.bool_matrix.float()
        return self._float_matrix

    @property
    def lengths(self) -> Tensor:
        """Per-row lengths (int64, shape ``shape[:-1]``) when every row is ones then zeros.

        For the matrix ``[[1, 1, 0], [1, 0, 0]]`` this is ``[2, 1]``.

        Raises:
            ValueError: if some row is not a run of ones followed by zeros.
        """
        if not hasattr(self, "_lengths"):
            with torch.no_grad():
                matrix = self.bool_matrix
                lengths = matrix.long().sum(dim=-1)
                positions = torch.arange(matrix.shape[-1], device=matrix.device)
                expected = positions < lengths.unsqueeze(-1)
                if not torch.equal(expected, matrix):
                    raise ValueError(
                        "the mask is not a length mask: some row is not a run of ones "
                        "followed by zeros"
                    )
                self._lengths = lengths
        return self._lengths

    @property
    def additive_matrix(self) -> Tensor:
        """Float matrix with ``0`` where allowed and ``-inf`` where masked out."""
        if not hasattr(self, "_additive_matrix"):
            with torch.no_grad():
                matrix = torch.zeros(self.shape, device=self.bool_matrix.device)
                self._additive_matrix = matrix.masked_fill(~self.bool_matrix, float("-inf"))
        return self._additive_matrix

    @property
    def additive_matrix_finite(self) -> Tensor:
        """Like `additive_matrix` but with ``-1e24`` instead of ``-inf``."""
        if not hasattr(self, "_additive_matrix_finite"):
            with torch.no_grad():
                self._additive_matrix_finite = (~self.bool_matrix).float() * (-1e24)
        return self._additive_matrix_finite

    @property
    def all_ones(self) -> bool:
        """``True`` when nothing is masked out."""
        if not hasattr(self, "_all_ones"):
            with torch.no_grad():
                self._all_ones = bool(torch.all(self.bool_matrix))
        return self._all_ones

    @property
    def lower_triangular(self) -> bool:
        """``True`` when row ``i`` allows exactly keys ``0..i``, i.e. the mask is causal.

        The mask may be square or have extra disallowed columns, e.g.
        ``LengthMask(torch.tensor([1, 2, 3]), max_len=4)`` (as in fast-transformers)."""
        if not hasattr(self, "_lower_triangular"):
            self._lower_triangular = False
            if len(self.shape) == 2 and self.shape[0] <= self.shape[1]:
                try:
                    lengths = self.lengths
                except ValueError:
                    lengths = None
                if lengths is not None:
                    target = torch.arange(1, len(lengths) + 1, device=lengths.device)
                    self._lower_triangular = bool(torch.equal(lengths, target))
        return self._lower_triangular

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)})"


class FullMask(BaseMask):
    """A mask given as an arbitrary boolean matrix, or all ones of a given size.

    Arguments:
        mask: boolean tensor (``True`` = may attend), or an int taken as ``N`` when ``N``
            and ``M`` are given positionally shifted (``FullMask(L)`` is an ``L x L``
            all-ones mask).
        N: number of rows when no tensor is given.
        M: number of columns (default: ``N``).
        device: device of the all-ones matrix (default: ``"cpu"``).

    Example:
        >>> FullMask(3).all_ones
        True
        >>> FullMask(torch.tensor([[True, False]])).additive_matrix
        tensor([[0., -inf]])
    """

    def __init__(self, mask=None, N=None, M=None, device="cpu"):
        if isinstance(mask, Tensor):
            if mask.dtype != torch.bool:
                raise ValueError(f"FullMask expects a bool tensor as mask; got dtype {mask.dtype}")
            with torch.no_grad():
                self._mask = mask.clone()
            return
        if (mask is not None and not isinstance(mask, int)) or isinstance(mask, bool):
            raise TypeError(
                f"FullMask: mask must be a bool tensor or an int size; got {type(mask).__name__}"
            )
        if mask is not None and M is None:
            # FullMask(N, M) or FullMask(N): the sizes were passed positionally.
            N, M = mask, N
        if N is None:
            raise ValueError("FullMask needs either a mask tensor or the size N")
        M = N if M is None else M
        for name, value in (("N", N), ("M", M)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"FullMask: {name} must be a non-negative int; got {value!r}")
        self._mask = torch.ones(N, M, dtype=torch.bool, device=device)
        self._all_ones = True

    @property
    def bool_matrix(self) -> Tensor:
        return self._mask

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._mask.shape)


class LengthMask(BaseMask):
    """A ``(N, max_len)`` mask from the number of valid positions of each sequence.

    Arguments:
        lengths: integer tensor of shape ``(N,)``; ``lengths[i]`` positions of sequence ``i``
            are real, the rest is padding.
        max_len: the padded length (default: ``lengths.max()``).
        device: where the mask lives (default: ``lengths.device``).

    Example:
        >>> LengthMask(torch.tensor([2, 3]), max_len=4).bool_matrix
        tensor([[ True,  True, False, False],
                [ True,  True,  True, False]])
    """

    def __init__(self, lengths: Tensor, max_len: int | None = None, device=None):
        if not isinstance(lengths, Tensor):
            raise TypeError(f"LengthMask: lengths must be a tensor; got {type(lengths).__name__}")
        if lengths.dim() != 1:
            raise ValueError(
                f"LengthMask: lengths must have shape (N,); got {tuple(lengths.shape)}"
            )
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise ValueError(f"LengthMask: lengths must be integers; got dtype {lengths.dtype}")
        self._device = torch.device(device) if device is not None else lengths.device
        with torch.no_grad():
            self._lengths = lengths.detach().to(self._device, torch.int64, copy=True)
        if max_len is None:
            if self._lengths.numel() == 0:
                raise ValueError("LengthMask: max_len is required when lengths is empty")
            max_len = int(self._lengths.max())
        if isinstance(max_len, Tensor):
            max_len = int(max_len)
        if not isinstance(max_len, int) or max_len < 0:
            raise ValueError(f"LengthMask: max_len must be a non-negative int; got {max_len!r}")
        self._max_len = max_len
        # the value checks read the lengths' values: skipped while torch.compile traces
        # (data-dependent control flow), where all_ones is then computed lazily
        if torch.compiler.is_compiling():
            return
        if self._lengths.numel() > 0:
            low, high = int(self._lengths.min()), int(self._lengths.max())
            if low < 0 or high > max_len:
                raise ValueError(
                    f"LengthMask: lengths must lie in [0, max_len={max_len}]; "
                    f"got values in [{low}, {high}]"
                )
        self._all_ones = bool((self._lengths == max_len).all())

    @property
    def bool_matrix(self) -> Tensor:
        if not hasattr(self, "_bool_matrix"):
            with torch.no_grad():
                positions = torch.arange(self._max_len, device=self._device)
                self._bool_matrix = positions.unsqueeze(0) < self._lengths.unsqueeze(1)
        return self._bool_matrix

    @property
    def lengths(self) -> Tensor:
        return self._lengths

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._lengths.shape[0], self._max_len)


class TriangularCausalMask(LengthMask):
    """The ``(N, N)`` causal mask: position ``i`` may attend to positions ``0..i``.

    Arguments:
        N: the sequence length.
        device: where the mask lives (default: ``"cpu"``).

    Example:
        >>> TriangularCausalMask(3).bool_matrix
        tensor([[ True, False, False],
                [ True,  True, False],
                [ True,  True,  True]])
    """

    def __init__(self, N: int, device="cpu"):
        if not isinstance(N, int) or isinstance(N, bool) or N < 0:
            raise ValueError(f"TriangularCausalMask: N must be a non-negative int; got {N!r}")
        lengths = torch.arange(1, N + 1, device=device)
        super().__init__(lengths, N, device)
        self._all_ones = N <= 1  # known without reading the lengths (also when compiling)
        self._lower_triangular = True


def zero_padding(x: Tensor, lengths: BaseMask) -> Tensor:
    """Return ``x`` with the positions that ``lengths`` masks out set to zero.

    Whatever a user left in the padding (``torch.empty`` garbage, NaN, inf) then cannot reach a
    valid output.

    A ``torch.where``, not a product with the mask (``0 * nan`` is NaN), and no work at all
    when ``lengths`` pads nothing. Every attention that takes a length mask applies it to its
    keys and values (and queries, where queries are mixed) before any arithmetic.

    Arguments:
        x: ``(N, S, H, F)`` queries, keys or values.
        lengths: a mask of shape ``(N, S)``, ``True`` at the valid positions.

    Returns:
        ``(N, S, H, F)``; ``x`` itself when nothing is padded.

    Example:
        >>> x = torch.full((1, 3, 1, 1), float("nan"))
        >>> zero_padding(x, LengthMask(torch.tensor([1]), max_len=3)).flatten()
        tensor([nan, 0., 0.])
    """
    if lengths.all_ones:
        return x
    return torch.where(lengths.bool_matrix[:, :, None, None], x, 0.0)
