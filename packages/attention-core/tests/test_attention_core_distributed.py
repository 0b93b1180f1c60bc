"""Batch encoders (full, linear, causal-linear) train identically under DDP and FSDP with two
gloo processes and in one process on the concatenated batch."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from attention_core.testing.distributed import TinyEncoder, check_data_parallel

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


@pytest.mark.slow  # spawns two gloo processes per case
def test_encoders_under_ddp_and_fsdp_match_one_process():
    generator = torch.Generator().manual_seed(1)
    batches = torch.randn(3, 4, 6, 16, dtype=torch.float64, generator=generator)
    cases = {
        name: (functools.partial(TinyEncoder, name, name.startswith("causal")), batches, "mse")
        for name in ("full", "linear", "causal-linear")
    }
    differences = check_data_parallel(cases)
    assert set(differences) == {(c, s) for c in cases for s in ("ddp", "fsdp")}
    assert max(differences.values()) < 1e-9


def test_check_data_parallel_rejects_bad_arguments():
    case = (nn.Linear, torch.zeros(1, 2, 3), "mse")
    with pytest.raises(ValueError, match="strategies must be among"):
        check_data_parallel({"a": case}, strategies=("zero",))
    with pytest.raises(ValueError, match="divisible by world_size=2"):
        check_data_parallel({"a": (nn.Linear, torch.zeros(1, 3, 3), "mse")})
    with pytest.raises(ValueError, match="loss of case 'a' must be one of"):
        check_data_parallel({"a": (nn.Linear, torch.zeros(1, 2, 3), "l1")})
