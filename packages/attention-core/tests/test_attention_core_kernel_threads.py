"""The compiled kernels run on torch's own OpenMP pool (DESIGN.md "Threads"): one libgomp in
the process, and the team size follows torch.set_num_threads."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from attention_core import _extension
from attention_core.causal_product import causal_dot_product
from attention_core.local_product import local_dot_product

pytestmark = pytest.mark.skipif(
    not _extension.kernels_available(), reason="attention_core._C is not compiled"
)

MAPPED_LIBGOMP = """
import attention_core.causal_product, attention_core._extension as ext, torch
assert ext._C is not None
torch.ones(64, 64) @ torch.ones(64, 64)  # torch's pool started
paths = set()
with open("/proc/self/maps") as maps:
    for line in maps:
        path = line.split()[-1] if len(line.split()) >= 6 else ""
        if "gomp" in path.rsplit("/", 1)[-1]:
            paths.add(path)
print("\\n".join(sorted(paths)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("first", ["attention_core.causal_product", "attention_core._C"])
def test_one_libgomp_torchs(first):
    """Whatever is imported first (here the extension itself, before torch), one libgomp."""
    script = f"import {first}\n" + MAPPED_LIBGOMP
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    mapped = result.stdout.split()
    assert len(mapped) == 1, f"expected exactly one libgomp mapped; got {mapped}"
    if _extension._C.openmp_enabled():
        assert "/torch/lib/" in mapped[0], f"expected torch's own libgomp; got {mapped[0]}"


def test_the_map_reader_sees_libraries():
    """The test above would pass vacuously if the reader found nothing: torch maps libgomp."""
    result = subprocess.run(
        [sys.executable, "-c", MAPPED_LIBGOMP], capture_output=True, text=True, timeout=300
    )
    assert result.stdout.strip(), "no libgomp found in /proc/self/maps at all"


@pytest.mark.skipif(not _extension._C.openmp_enabled(), reason="built without OpenMP")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_team_follows_torch_set_num_threads(threads):
    g = torch.Generator().manual_seed(threads)
    Q, K, V = (torch.rand(2, 4, 256, 32, generator=g) for _ in range(3))
    keys_lengths = torch.full((2,), 256, dtype=torch.int64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        causal_dot_product(Q, K, V)
        assert _extension._C.last_team_size() == threads
        local_dot_product(Q, K, torch.zeros(256, 256), keys_lengths, 64)
        assert _extension._C.last_team_size() == threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not _extension._C.openmp_enabled(), reason="built without OpenMP")
def test_results_do_not_depend_on_the_team():
    g = torch.Generator().manual_seed(0)
    Q, K, V = (torch.rand(2, 4, 100, 8, generator=g, dtype=torch.float64) for _ in range(3))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(causal_dot_product(Q, K, V))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
