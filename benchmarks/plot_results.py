"""Plots for the benchmark page, from the JSON numbers the bench scripts write next to their
tables in ``docs/benchmarks/`` (run last by ``nox -s bench``; needs matplotlib).

- ``causal_linear.svg``: time and peak memory of causal attention (forward+backward) against
  the sequence length: attention-core's kernel, fast-transformers, plain PyTorch and full
  softmax attention (from ``causal_linear.json``);
- ``generation.svg``: milliseconds per generated token against the context length, one panel
  per model size: this project's families (``generation.json``), and the Feedback Transformer
  against feedback-transformer-pytorch (``feedback_generation.json``);
- ``block_recurrent.svg``: training and generation throughput and activation memory of the
  Block-Recurrent Transformer against block-recurrent-transformer-pytorch
  (``block_recurrent.json``);
- ``feedback.svg``: the same for the Feedback Transformer against feedback-transformer-pytorch
  (``feedback.json``).

The figures have a transparent background, grey text and mid-contrast colours, so that one
image reads on the site's light and dark themes alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FixedLocator, NullLocator

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks"
GREY = "#8a8a8a"  # readable on white and on the dark theme's slate
COLOURS = ["#2f7ed8", "#e8743b", "#19a979", "#d64b8a", "#945ecf", "#c9a20b"]
plt.rcParams.update(
    {
        "svg.hashsalt": "attention-core",  # stable element ids: small diffs in git
        "savefig.transparent": True,
        "text.color": GREY,
        "axes.labelcolor": GREY,
        "axes.edgecolor": GREY,
        "axes.titlecolor": GREY,
        "xtick.color": GREY,
        "ytick.color": GREY,
        "grid.color": GREY,
        "grid.alpha": 0.35,
        "legend.frameon": False,
        "axes.prop_cycle": plt.cycler(color=COLOURS),
        "lines.linewidth": 2,
        "font.size": 11,
    }
)


def save(figure, name: str) -> None:
    figure.savefig(OUT / name, metadata={"Date": None}, bbox_inches="tight")
    plt.close(figure)
    print(f"wrote {OUT / name}")


def plain_log_axis(axis, ticks, which: str = "x") -> None:
    """A log axis labelled with the plain numbers ``ticks`` (not powers of ten)."""
    ticks = sorted(ticks)
    getattr(axis, f"set_{which}scale")("log")
    target = axis.xaxis if which == "x" else axis.yaxis
    target.set_major_locator(FixedLocator(ticks))
    target.set_minor_locator(NullLocator())
    labels = [f"{t:g}" if t < 1000 else f"{t:,.0f}" for t in ticks]
    getattr(axis, f"set_{which}ticks")(ticks, labels)


def round_ticks(low: float, high: float) -> list[float]:
    """1-2-5 steps covering ``[low, high]``, for a log axis with plain labels."""
    ticks, scale = [], 10 ** (len(str(int(low))) - 1) if low >= 1 else 0.1
    while scale / 10 > low:
        scale /= 10
    while True:
        for step in (1, 2, 5):
            value = step * scale
            if value > high * 1.5:
                return [t for t in ticks if t >= low / 2] or [low, high]
            ticks.append(value)
        scale *= 10


def plot_causal_linear() -> None:
    path = OUT / "causal_linear.json"
    if not path.is_file():
        return
    stored = json.loads(path.read_text())
    rows = [r for r in stored["rows"] if r["workload"] == "attention"]
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    lengths = sorted({r["N"] for r in rows})
    times, peaks = [], []
    for contender in dict.fromkeys(r["contender"] for r in rows):
        mine = sorted((r for r in rows if r["contender"] == contender), key=lambda r: r["N"])
        time_axis.plot([r["N"] for r in mine], [r["forward+backward"] for r in mine], "o-",
                       label=contender)  # fmt: skip
        times += [r["forward+backward"] for r in mine]
        memory = [(r["N"], r["forward+backward MiB"]) for r in mine if r["forward+backward MiB"]]
        if memory:
            memory_axis.plot(*zip(*memory, strict=True), "o-", label=contender)
            peaks += [m for _, m in memory]
    for axis, label, values in (
        (time_axis, "forward+backward (ms)", times),
        (memory_axis, "peak memory, forward+backward (MiB)", peaks),
    ):
        plain_log_axis(axis, lengths, "x")
        plain_log_axis(axis, round_ticks(min(values), max(values)), "y")
        axis.set_xlabel("sequence length N")
        axis.set_ylabel(label)
        axis.grid(True, which="major")
    handles, labels = time_axis.get_legend_handles_labels()
    figure.legend(
        handles, labels, loc="lower center", ncol=len(labels), bbox_to_anchor=(0.5, -0.06)
    )
    figure.suptitle("Causal attention on the CPU: B=1, H=8, D=64, float32, 2 threads")
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    save(figure, "causal_linear.svg")


def _generation_panel(axis, rows: list[dict], title: str) -> None:
    contexts = sorted({r["context"] for r in rows})
    values = [r["ms_per_token"] for r in rows]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["context"])
        axis.plot([r["context"] for r in mine], [r["ms_per_token"] for r in mine], "o-",
                  label=model)  # fmt: skip
    plain_log_axis(axis, contexts, "x")
    axis.set_ylim(0, max(values) * 1.1)
    axis.set_xlabel("tokens already in the context")
    axis.set_ylabel("ms per generated token")
    axis.set_title(title, fontsize=11)
    axis.grid(True)
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=1, fontsize=10)


def plot_generation() -> None:
    panels = []
    ours = OUT / "generation.json"
    if ours.is_file():
        rows = json.loads(ours.read_text())
        panels.append((rows, "This project's model families, d=128"))
    peer = OUT / "feedback_generation.json"
    if peer.is_file():
        rows = json.loads(peer.read_text())
        panels.append((rows, "Feedback Transformer against its peer, d=256, depth 4"))
    if not panels:
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.2), squeeze=False)
    for axis, (rows, title) in zip(axes[0], panels, strict=True):
        _generation_panel(axis, rows, title)
    figure.suptitle("Token-by-token generation on the CPU: batch 1, float32, 2 threads")
    figure.tight_layout()
    save(figure, "generation.svg")


def _bars(axis, groups: list[str], series: dict[str, list[float]], label: str, fmt: str) -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per series, values on top."""
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        positions = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = axis.bar(positions, values, width, label=name, color=COLOURS[i])
        axis.bar_label(bars, [format(v, fmt) for v in values], fontsize=9, color=GREY, padding=2)
    axis.set_xticks(range(len(groups)), groups)
    axis.set_title(label, fontsize=11)
    axis.margins(y=0.15)
    axis.grid(True, axis="y")
    axis.set_axisbelow(True)


def plot_block_recurrent() -> None:
    path = OUT / "block_recurrent.json"
    if not path.is_file():
        return
    numbers = json.loads(path.read_text())
    groups = list(numbers)
    contenders = list(dict.fromkeys(c for config in numbers.values() for c in config))
    panels = (
        ("forward_backward", "training tokens/s (higher is better)", ",.0f"),
        ("generation", "generation tokens/s (higher is better)", ",.0f"),
        ("saved_mib", "saved for backward, MiB (lower is better)", ",.0f"),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(13, 4.4))
    for axis, (key, label, fmt) in zip(axes, panels, strict=True):
        series = {c: [numbers[g][c][key] for g in groups] for c in contenders}
        _bars(axis, groups, series, label, fmt)
    handles, labels = axes[0].get_legend_handles_labels()
    names = {"peer 0.4.4": "block-recurrent-transformer-pytorch 0.4.4"}
    labels = [names.get(label, label) for label in labels]
    figure.legend(
        handles, labels, loc="lower center", ncol=len(labels), bbox_to_anchor=(0.5, -0.02)
    )
    figure.suptitle("Block-Recurrent Transformer on the CPU: 2 threads, float32")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    save(figure, "block_recurrent.svg")


def plot_feedback() -> None:
    path = OUT / "feedback.json"
    if not path.is_file():
        return
    rows = json.loads(path.read_text())
    groups = [f"seq_len {s}" for s in dict.fromkeys(r["seq_len"] for r in rows)]
    names = {"peer": "feedback-transformer-pytorch 0.0.11", "ours": "feedback-transformer"}
    panels = (
        ("fwd", "inference tokens/s (higher is better)", ",.0f"),
        ("fwd_bwd", "training tokens/s (higher is better)", ",.0f"),
        ("saved", "saved for backward, MiB (lower is better)", ",.0f"),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(13, 4.4))
    for axis, (key, label, fmt) in zip(axes, panels, strict=True):
        series = {
            names[c]: [r[key] for r in rows if r["contender"] == c]
            for c in dict.fromkeys(r["contender"] for r in rows)
        }
        _bars(axis, groups, series, label, fmt)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(
        handles, labels, loc="lower center", ncol=len(labels), bbox_to_anchor=(0.5, -0.02)
    )
    figure.suptitle("Feedback Transformer on the CPU: d=256, depth 4, mem_len 256, 2 threads")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    save(figure, "feedback.svg")


if __name__ == "__main__":
    plot_causal_linear()
    plot_generation()
    plot_block_recurrent()
    plot_feedback()
