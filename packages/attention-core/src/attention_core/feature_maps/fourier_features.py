"""Random feature maps: random Fourier features and the positive random features of Performers.

Random Fourier features approximate the RBF kernel. Reference: Choromanski et al. 2020, arXiv
2009.14794."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from math import log, sqrt

import torch
from torch import Tensor

from .base import FeatureMap

__all__ = [
    "Favor",
    "GeneralizedRandomFeatures",
    "RandomFourierFeatures",
    "SmoothedRandomFourierFeatures",
    "orthogonal_random_matrix_",
]


def orthogonal_random_matrix_(w: Tensor) -> Tensor:
    """Fill ``w`` of shape ``(rows, columns)`` in place with orthogonal random features.

    Columns are orthogonal in groups of ``rows``; their norms follow the chi distribution
    with ``rows`` degrees of freedom, like the norm of a ``N(0, I_rows)`` vector.
    """
    rows, columns = w.shape
    start = 0
    with torch.no_grad():
        while start < columns:
            end = min(start + rows, columns)
            block = torch.randn(rows, rows, device=w.device, dtype=w.dtype)
            norms = block.norm(dim=1)
            q, _ = torch.linalg.qr(block)
            w[:, start:end] = q[:, : end - start] * norms[None, : end - start]
            start += rows
    return w


class RandomFourierFeatures(FeatureMap):
    """Random Fourier features for the RBF kernel ``exp(-t |x - y|^2 / 2)``.

    ``phi(x) = [cos(x W), sin(x W)] / sqrt(m)`` with ``W ~ N(0, I)`` of shape
    ``(query_dimensions, m)``, ``m = n_dims // 2``, after scaling ``x`` by
    ``sqrt(softmax_temp)``, so that ``phi(x) . phi(y)`` is the mean of ``cos(w . (x - y))``
    over the ``m`` drawn frequencies.

    Arguments:
        query_dimensions: the head dimension ``E``.
        n_dims: the size of the feature map, even; an odd value gives ``n_dims - 1``
            features (default: ``query_dimensions``).
        softmax_temp: the temperature ``t`` (default: ``1 / sqrt(query_dimensions)``).
        orthogonal: draw orthogonal random features to reduce variance (default: False).
        redraw: draw a new matrix every ``redraw`` calls of ``new_feature_map`` (default: 1).
        deterministic_eval: do not redraw in eval mode (default: False).

    Thread safety: ``new_feature_map`` hands the calling thread the matrix it drew (or
    kept), and the thread's later ``forward_queries``/``forward_keys`` calls use that
    matrix whatever other threads draw meanwhile, so one attention forward projects its
    queries and keys with the same features. ``omega`` holds the latest matrix drawn by
    any thread; assigning it (or moving the module) makes every thread use the new value.
    Under ``torch.compile`` the features are simply ``omega`` (no per-thread matrices).
    """

    def __init__(
        self,
        query_dimensions: int,
        n_dims: int | None = None,
        softmax_temp: float | None = None,
        orthogonal: bool = False,
        redraw: int = 1,
        deterministic_eval: bool = False,
    ):
        super().__init__(query_dimensions)
        self.n_dims = n_dims or query_dimensions
        if self.n_dims < 2:
            raise ValueError(f"n_dims must be at least 2; got {self.n_dims}")
        if not isinstance(redraw, int) or redraw < 1:
            raise ValueError(f"redraw must be a positive int; got {redraw!r}")
        self.query_dimensions = query_dimensions
        self.orthogonal = orthogonal
        self.softmax_temp = 1 / sqrt(query_dimensions) if softmax_temp is None else softmax_temp
        self.redraw = redraw
        self.deterministic_eval = deterministic_eval
        self.register_buffer("omega", torch.zeros(query_dimensions, self.n_dims // 2))
        self._calls = -1
        self._init_thread_state()

    def _init_thread_state(self) -> None:
        # _published: the last matrix handed out by new_feature_map; _thread.omega: the one
        # handed to this thread. Neither is pickled (see __getstate__).
        self._lock = threading.Lock()
        self._thread = threading.local()
        self._published = None

    def __getstate__(self):
        state = dict(super().__getstate__())
        for name in ("_lock", "_thread", "_published"):
            state.pop(name, None)
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._init_thread_state()

    def new_feature_map(self, device) -> None:
        """Redraw ``omega`` on ``device`` and hand it to the calling thread.

        Redrawn every ``redraw`` calls; never in deterministic eval."""
        if torch.compiler.is_compiling():  # no locks nor thread state inside a graph
            self._draw(device)
            return
        with self._lock:
            self._draw(device)
            self._published = self.omega
            self._thread.omega = self.omega

    def _draw(self, device) -> None:
        if self.deterministic_eval and not self.training:
            return
        self._calls += 1
        if self._calls % self.redraw == 0:
            omega = torch.zeros(self.query_dimensions, self.n_dims // 2, device=device)
            if self.orthogonal:
                orthogonal_random_matrix_(omega)
            else:
                omega.normal_()
            self.omega = omega

    def _omega(self) -> Tensor:
        """The matrix of the calling thread.

        The one ``new_feature_map`` handed it, unless ``omega`` was replaced from outside since the
        last draw."""
        if torch.compiler.is_compiling():
            return self.omega
        mine = getattr(self._thread, "omega", None)
        if mine is None or self.omega is not self._published:
            return self.omega
        return mine

    def _project(self, x: Tensor) -> Tensor:
        return x @ self._omega().to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        u = self._project(x * sqrt(self.softmax_temp))
        phi = torch.cat([torch.cos(u), torch.sin(u)], dim=-1)
        # scale by the number of frequencies actually drawn: sqrt(2 / n_dims) would bias
        # the kernel by (n_dims - 1) / n_dims for odd n_dims (e.g. the smoothed default)
        return phi / sqrt(u.shape[-1])


class SmoothedRandomFourierFeatures(RandomFourierFeatures):
    """Random Fourier features plus a constant feature, so ``K(x, y) = rbf(x, y) + s``.

    The constant keeps the normaliser of linear attention away from zero.

    Arguments:
        query_dimensions: the head dimension.
        n_dims: total feature size including the constant (default: ``query_dimensions``).
        softmax_temp: see `RandomFourierFeatures`.
        orthogonal: see `RandomFourierFeatures`.
        smoothing: the constant ``s`` added to the kernel (default: 1.0).
        redraw: see `RandomFourierFeatures`.
        deterministic_eval: see `RandomFourierFeatures`.
    """

    def __init__(
        self,
        query_dimensions: int,
        n_dims: int | None = None,
        softmax_temp: float | None = None,
        orthogonal: bool = False,
        smoothing: float = 1.0,
        redraw: int = 1,
        deterministic_eval: bool = False,
    ):
        super().__init__(
            query_dimensions,
            n_dims=query_dimensions - 1 if n_dims is None else n_dims - 1,
            softmax_temp=softmax_temp,
            orthogonal=orthogonal,
            redraw=redraw,
            deterministic_eval=deterministic_eval,
        )
        self.smoothing = smoothing

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        smoothing = y.new_full((*y.shape[:-1], 1), sqrt(self.smoothing))
        return torch.cat([y, smoothing], dim=-1)


class Favor(RandomFourierFeatures):
    """Positive orthogonal random features for the softmax kernel.

    Reference: FAVOR+, Lemma 1 of Choromanski et al. 2020.

    ``phi(x) = exp(-|x|^2 / 2) / sqrt(2 m) [exp(x W), exp(-x W)]`` with ``W`` of shape
    ``(query_dimensions, m)``, ``m = n_dims // 2``, so that
    ``E[phi(q) . phi(k)] = exp(q . k)`` after scaling by ``sqrt(softmax_temp)``.

    Arguments:
        query_dimensions: the head dimension.
        n_dims: the feature size (default: ``query_dimensions``).
        softmax_temp: see `RandomFourierFeatures`.
        orthogonal: see `RandomFourierFeatures`.
        stabilize: subtract the largest squared norm per sequence (dimension 1 of an
            ``(N, L, H, E)`` input) before exponentiating, avoiding overflow. The shift
            cancels in the normalised attention. (default: False)
        redraw: see `RandomFourierFeatures`.
        deterministic_eval: see `RandomFourierFeatures`.
    """

    def __init__(
        self,
        query_dimensions: int,
        n_dims: int | None = None,
        softmax_temp: float | None = None,
        orthogonal: bool = False,
        stabilize: bool = False,
        redraw: int = 1,
        deterministic_eval: bool = False,
    ):
        super().__init__(
            query_dimensions,
            n_dims=n_dims,
            softmax_temp=softmax_temp,
            orthogonal=orthogonal,
            redraw=redraw,
            deterministic_eval=deterministic_eval,
        )
        self.stabilize = stabilize

    def _check_sequence_length(self, x: Tensor) -> None:
        if x.dim() != 4:
            warnings.warn(
                "Favor.stabilize is set but the input does not have the shape (N, L, H, E)",
                stacklevel=3,
            )
        elif x.shape[1] < x.shape[2]:
            warnings.warn(
                "Favor.stabilize is set but the input has fewer positions than heads; "
                "is it (N, L, H, E)?",
                stacklevel=3,
            )

    def forward(self, x: Tensor) -> Tensor:
        x = x * sqrt(self.softmax_temp)
        norm_x_squared = (x * x).sum(dim=-1, keepdim=True)
        u = self._project(x)
        offset = norm_x_squared * 0.5 + 0.5 * log(2 * u.shape[-1])
        if self.stabilize:
            self._check_sequence_length(norm_x_squared)
            offset = offset + norm_x_squared.amax(dim=1, keepdim=True)
        return torch.cat([torch.exp(u - offset), torch.exp(-u - offset)], dim=-1)


class GeneralizedRandomFeatures(RandomFourierFeatures):
    """Generalised random features of Performers: ``phi(x) = f(x W)``.

    Arguments:
        query_dimensions: the head dimension.
        n_dims: the feature size (default: ``query_dimensions``).
        softmax_temp: inputs are multiplied by ``sqrt(softmax_temp)`` (default: 1.0).
        orthogonal: see `RandomFourierFeatures`.
        kernel_fn: the elementwise ``f`` (default: ``torch.relu``).
        redraw: see `RandomFourierFeatures`.
        deterministic_eval: see `RandomFourierFeatures`.
    """

    def __init__(
        self,
        query_dimensions: int,
        n_dims: int | None = None,
        softmax_temp: float = 1.0,
        orthogonal: bool = False,
        kernel_fn: Callable[[Tensor], Tensor] = torch.relu,
        redraw: int = 1,
        deterministic_eval: bool = False,
    ):
        super().__init__(
            query_dimensions,
            n_dims=2 * query_dimensions if n_dims is None else 2 * n_dims,
            softmax_temp=softmax_temp,
            orthogonal=orthogonal,
            redraw=redraw,
            deterministic_eval=deterministic_eval,
        )
        self.kernel_fn = kernel_fn

    def forward(self, x: Tensor) -> Tensor:
        if self.softmax_temp != 1.0:
            x = x * sqrt(self.softmax_temp)
        return self.kernel_fn(self._project(x))
