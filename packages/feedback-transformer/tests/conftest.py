"""One intra-op thread for this package's tests.

The Feedback Transformer runs its steps one after another on a few rows each: the ops are
too small to split, and on a shared machine a second thread mostly waits (the suite runs
several times slower with two threads under load). The previous setting is restored after
each test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
