"""Plots for the benchmark page, from the JSON rows the bench scripts write next to their
tables in ``docs/benchmarks/`` (run last by ``nox -s bench``; needs matplotlib).

- ``causal_linear.svg``: time and peak memory of causal attention (forward+backward) against
  the sequence length: attention-core's kernel, fast-transformers, plain PyTorch and full
  softmax attention (from ``causal_linear.json``);
- ``generation.svg``: milliseconds per generated token against the context length, one line
  per model family (from every ``*generation.json``: rows of ``model``, ``context``,
  ``ms_per_token``).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks"
plt.rcParams["svg.hashsalt"] = "attention-core"  # stable element ids: small diffs in git


def save(figure, name: str) -> None:
    figure.tight_layout()
    figure.savefig(OUT / name, metadata={"Date": None})
    plt.close(figure)
    print(f"wrote {OUT / name}")


def plot_causal_linear() -> None:
    path = OUT / "causal_linear.json"
    if not path.is_file():
        return
    rows = [r for r in json.loads(path.read_text()) if r["workload"] == "attention"]
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for contender in dict.fromkeys(r["contender"] for r in rows):
        mine = sorted((r for r in rows if r["contender"] == contender), key=lambda r: r["N"])
        lengths = [r["N"] for r in mine]
        time_axis.plot(lengths, [r["forward+backward"] for r in mine], "o-", label=contender)
        memory = [(r["N"], r["forward+backward MiB"]) for r in mine if r["forward+backward MiB"]]
        if memory:
            memory_axis.plot(*zip(*memory, strict=True), "o-", label=contender)
    for axis, label in ((time_axis, "forward+backward (ms)"), (memory_axis, "peak memory (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length N")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    time_axis.legend()
    figure.suptitle("Causal attention, B=1, H=8, D=64, float32, 2 threads")
    save(figure, "causal_linear.svg")


def plot_generation() -> None:
    rows = []
    for path in sorted(OUT.glob("*generation.json")):
        rows += json.loads(path.read_text())
    if not rows:
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["context"])
        axis.plot([r["context"] for r in mine], [r["ms_per_token"] for r in mine], "o-",
                  label=model)  # fmt: skip
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("context length (tokens)")
    axis.set_ylabel("ms per generated token")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.suptitle("Token-by-token generation, batch 1, 2 threads")
    save(figure, "generation.svg")


if __name__ == "__main__":
    plot_causal_linear()
    plot_generation()
