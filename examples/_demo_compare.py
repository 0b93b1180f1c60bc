"""``demo.py --compare``: every model family trained on the same corpus with the same budget,
each in a process of its own (so that its peak memory is its own), then one table and a plot
of validation bits per character against training time.

The budget (``--budget``) is either the same training time for every family (``time``, the
default: ``--minutes`` or ``--steps``) or the same number of training tokens (``tokens``: the
first family trains for ``--minutes`` and every other family for as many tokens as it saw,
however long that takes)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import markdown_table
from _demo_threads import default_threads, plural

DEMO = Path(__file__).resolve().parent / "demo.py"
CURVE_POINTS = 8
#: options passed on to every family's run unchanged
SHARED = ("data", "max_bytes", "minutes", "steps", "dim", "depth", "window", "batch", "lr",
          "seq_len", "sample_length", "prompt_length", "temperature", "seed",
          "threads")  # fmt: skip


def child_arguments(args, family: str, workdir: Path, steps: int | None = None) -> list[str]:
    """The command-line of one family's run (``steps``: instead of the time budget)."""
    argv = ["--model", family, "--curve-points", str(CURVE_POINTS)]
    for name in SHARED:
        value = getattr(args, name)
        if steps is not None and name in ("minutes", "steps"):
            value = steps if name == "steps" else None
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    if args.no_progress:
        argv.append("--no-progress")
    argv += ["--checkpoint", str(workdir / f"{family}.pt")]
    return [*argv, "--summary-json", str(workdir / f"{family}.json")]


def table(summaries: list[dict]) -> str:
    """The Markdown table of the runs."""
    header = ["family", "parameters", "training tokens/s", "steps", "validation bits/char",
              "generation tokens/s", "peak memory (MiB)"]  # fmt: skip
    rows = [
        [
            s["model"],
            f"{s['parameters'] / 1e6:.2f}M",
            f"{s['train_tokens_per_s']:,.0f}",
            f"{s['steps']:,}",
            f"{s['bpc']:.3f}",
            f"{s['generation_tokens_per_s']:,.0f}",
            f"{s['peak_memory_mb']:,.0f}",
        ]
        for s in summaries
    ]
    return markdown_table(header, rows)


def plot(summaries: list[dict], path: Path, title: str) -> None:
    """Validation bits per character against training seconds, one line per family."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "--compare-out needs matplotlib: pip install -r examples/requirements.txt"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grey = "#8a8a8a"  # a transparent figure with grey text reads on light and dark pages
    style = {"savefig.transparent": True, "text.color": grey, "axes.labelcolor": grey,
             "axes.edgecolor": grey, "xtick.color": grey, "ytick.color": grey,
             "legend.frameon": False, "svg.hashsalt": "attention-core"}  # fmt: skip
    with plt.rc_context(style):
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        for s in summaries:
            seconds, bpc = zip(*s["curve"]) if s["curve"] else ((), ())
            ax.plot(seconds, bpc, marker="o", label=s["model"])
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("validation bits per character")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.35, color=grey)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, metadata={"Date": None})
        plt.close(fig)


def compare(args, argv: list[str], families: tuple[str, ...]) -> dict:
    """Run every family with the options of ``args``; print (and with ``--compare-out``,
    write) the table and the plot. Returns ``{"runs": [summary, ...]}``."""
    budget = f"{args.steps} steps" if args.steps is not None else f"{args.minutes:g} min"
    if args.threads is None:  # one count for every family, chosen once
        args.threads, reason = default_threads()
        print(f"every family uses {plural(args.threads, 'thread')} ({reason})")
    summaries: list[dict] = []
    steps = None  # --budget tokens: the first family's step count, for the others
    with tempfile.TemporaryDirectory(prefix="demo-compare-") as tmp:
        for family in families:
            now = budget if steps is None else f"{steps:,} steps ({families[0]}'s tokens)"
            print(f"\n=== {family}: {now} of training ===", flush=True)
            child = child_arguments(args, family, Path(tmp), steps)
            subprocess.run([sys.executable, str(DEMO), *child], check=True)
            summaries.append(json.loads((Path(tmp) / f"{family}.json").read_text()))
            if args.budget == "tokens" and steps is None:
                steps = summaries[0]["steps"]
    short = budget
    if args.budget == "tokens":
        tokens = summaries[0]["tokens"]
        short = f"{tokens / 1e6:.2f}M tokens"
        budget = f"{tokens:,} training tokens ({families[0]}'s in {budget})"
    threads = summaries[0]["threads"]
    text = table(summaries)
    command = "nox -s demo -- " + " ".join(argv)
    caption = (
        f"Training budget: {budget} per family, {plural(threads, 'thread')}, batch {args.batch}, "
        f"window {args.window}, dim {args.dim}, depth {args.depth}, peak learning rate "
        f"{args.lr:g}; feedback: windows of {args.seq_len} tokens (seq_len), memory of "
        f"{args.window} steps (mem_len); validation over 64 random windows; run on "
        f"{time.strftime('%Y-%m-%d')}."
    )
    print(f"\n{text}\n\n{caption}")
    if args.compare_out:
        out = Path(args.compare_out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "demo_compare.md").write_text(f"{text}\n\n{caption} Command: `{command}`\n")
        (out / "demo_compare.json").write_text(json.dumps(summaries, indent=1) + "\n")
        title = f"{short} per family, {plural(threads, 'thread')}, on the CPU"
        plot(summaries, out / "demo_compare.svg", title)
        print(f"wrote {out / 'demo_compare.md'} and {out / 'demo_compare.svg'}")
    return {"runs": summaries}
