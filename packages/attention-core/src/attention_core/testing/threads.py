"""Thread-safety checks of modules with per-call randomness.

A feature map whose random features another thread redraws between every two projections of a
forward call."""

from __future__ import annotations

import threading

from torch import Tensor

from ..feature_maps import FeatureMap

__all__ = ["interfered"]


def _redraw_from_another_thread(feature_map: FeatureMap) -> None:
    thread = threading.Thread(target=feature_map.new_feature_map, args=("cpu",))
    thread.start()
    thread.join()


def interfered(feature_map_class: type[FeatureMap]) -> type[FeatureMap]:
    """A feature map class that lets another thread redraw between every two projections.

    A subclass of ``feature_map_class`` that records every projection it returns, as
    ``("queries" | "keys", features, thread identifier)`` in its list ``projections``, and then lets
    another thread call ``new_feature_map`` (the worst interleaving of concurrent forward calls).

    A thread-safe attention projects its queries and keys with the same features anyway:
    with queries equal to keys, the recorded query and key features are equal.

    Example:
        >>> import torch
        >>> from attention_core.feature_maps import Favor
        >>> phi = interfered(Favor)(8, n_dims=16)
        >>> phi.new_feature_map("cpu")
        >>> x = torch.randn(2, 5, 1, 8)
        >>> torch.equal(phi.forward_queries(x), phi.forward_keys(x))
        True
    """

    class Interfered(feature_map_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.projections: list[tuple[str, Tensor, int]] = []

        def forward_queries(self, x: Tensor) -> Tensor:
            features = super().forward_queries(x)
            self.projections.append(("queries", features, threading.get_ident()))
            _redraw_from_another_thread(self)
            return features

        def forward_keys(self, x: Tensor) -> Tensor:
            features = super().forward_keys(x)
            self.projections.append(("keys", features, threading.get_ident()))
            _redraw_from_another_thread(self)
            return features

    Interfered.__name__ = Interfered.__qualname__ = f"Interfered{feature_map_class.__name__}"
    return Interfered
