"""Fixtures shared by the recurrent-transformer tests."""

from __future__ import annotations

import pytest

from attention_core.step_chain import StepChain


@pytest.fixture
def chain_calls(monkeypatch):
    """The calls of any `StepChain` during the test, one entry each (spied on)."""
    calls = []
    call = StepChain.__call__
    monkeypatch.setattr(
        StepChain, "__call__", lambda self, *a, **k: calls.append(1) or call(self, *a, **k)
    )
    return calls
