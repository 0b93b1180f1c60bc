"""The copy and recall examples run end to end on tiny settings and report what they measured."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the scripts import examples/_common.py as a sibling


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


copy_task = load("copy_task")
recall_task = load("recall_task")


def test_copy_batches_repeat_the_first_half():
    inputs, targets = copy_task.copy_batch(3, 5, 4, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (3, 11)
    assert (inputs[:, 0] == 0).all() and (inputs[:, 6] == 0).all()
    assert torch.equal(inputs[:, 1:5], inputs[:, 7:])
    assert (targets[:, :6] == -100).all() and torch.equal(targets[:, 6:], inputs[:, 1:6])


def test_recall_batches_hold_the_key_first_and_the_query_last():
    tokens, key = recall_task.recall_batch(4, 6, 3, 5, torch.Generator().manual_seed(0))
    assert tokens.shape == (4, 8) and torch.equal(tokens[:, 0], key)
    assert ((tokens[:, 1:-1] > 3) & (tokens[:, 1:-1] <= 8)).all() and (tokens[:, -1] == 9).all()


def test_copy_task_runs_every_attention(tmp_path):
    out = tmp_path / "copy.md"
    results = copy_task.main(["--steps", "2", "--length", "4", "--batch", "4", "--dim", "32",
                              "--layers", "1", "--output", str(out)])  # fmt: skip
    assert [r["attention"] for r in results] == list(copy_task.ATTENTIONS)
    assert all(0 <= r["accuracy"] <= 1 and r["ms_per_step"] > 0 for r in results)
    assert "| causal-linear |" in out.read_text()


def test_recall_task_runs_every_model(tmp_path):
    out = tmp_path / "recall.md"
    results = recall_task.main(["--steps", "2", "--distance", "10", "--window", "4",
                                "--batch", "4", "--dim", "32", "--depth", "1",
                                "--output", str(out)])  # fmt: skip
    assert [r["model"] for r in results] == list(recall_task.MODELS)
    assert "| feedback |" in out.read_text()
    with pytest.raises(SystemExit):
        recall_task.main(["--window", "10", "--distance", "10"])


def test_position_schemes_compares_every_scheme_inside_and_past_the_window():
    position_schemes = load("position_schemes")
    results = position_schemes.main(
        ["--steps", "2", "--window", "8", "--dim", "32", "--depth", "1", "--batch", "2",
         "--max-bytes", "30000", "--attentions", "causal-linear"]
    )  # fmt: skip
    assert [r["scheme"] for r in results] == list(position_schemes.POSITIONAL_ENCODINGS)
    assert all(len(r["bits"]) == 3 and all(0 < b < 12 for b in r["bits"]) for r in results)
