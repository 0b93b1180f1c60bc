"""The demo (examples/demo.py) trains, evaluates, checkpoints, resumes and samples with every
model family, on tiny settings."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = load("demo")
TINY = ["--steps", "2", "--dim", "32", "--depth", "1", "--window", "32", "--batch", "2",
        "--sample-length", "5", "--max-bytes", "30000", "--no-progress"]  # fmt: skip


@pytest.mark.parametrize("family", demo.FAMILIES)
def test_demo_trains_checkpoints_resumes_and_samples(family, tmp_path, capsys):
    checkpoint = str(tmp_path / "ckpt.pt")
    first = demo.main(["--model", family, "--checkpoint", checkpoint, *TINY])
    assert first["steps"] == 2 and first["tokens"] == 2 * 2 * 32
    assert math.isfinite(first["bpc"]) and 0 < first["bpc"] < 12
    assert first["sampled"] == 5
    assert Path(checkpoint).is_file()
    resumed = demo.main(["--model", family, "--checkpoint", checkpoint, "--resume", *TINY])
    assert resumed["steps"] == 4 and resumed["tokens"] == 2 * first["tokens"]
    out = capsys.readouterr().out
    assert "resumed from" in out and "bits per character" in out


def test_demo_trains_on_a_given_text_file(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    summary = demo.main(["--data", str(text), "--checkpoint", str(tmp_path / "c.pt"), *TINY])
    assert summary["steps"] == 2


def test_demo_refuses_a_tiny_corpus_and_a_mismatched_resume(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("too short")
    with pytest.raises(SystemExit, match="need at least 4096"):
        demo.main(["--data", str(text), *TINY])
    checkpoint = str(tmp_path / "c.pt")
    demo.main(["--checkpoint", checkpoint, *TINY])
    with pytest.raises(SystemExit, match=r"--resume: .* holds"):
        demo.main(["--checkpoint", checkpoint, "--resume", *TINY, "--dim", "64"])
    with pytest.raises(SystemExit, match="no checkpoint"):
        demo.main(["--checkpoint", str(tmp_path / "none.pt"), "--resume", *TINY])
